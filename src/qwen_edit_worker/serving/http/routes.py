"""The load-balancing endpoint's routes: each reads its request, hands the job to the Worker, answers.

Why this exists: routes stay thin so that an edit means the same on both front doors: the form
becomes the job input that schema.py validates (openai_images), the Worker runs it exactly as it
runs a queue job (same GPU section, same errors), and the answer is shaped for the caller:
OpenAI's ImagesResponse for `/v1/images/edits`, RunPod's queue answer for `/runsync`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from ...errors import RequestError
from ..worker import Worker
from . import openai_images
from .admission import Admission
from .errors import ApiError, error_response

STARTED = int(time.time())


class Routes:
    """The route handlers of one server, over one Worker and its Admission."""

    def __init__(self, worker: Worker, admission: Admission) -> None:
        self.worker, self.admission = worker, admission

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/ping", self.ping)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/images/edits", self.edits)
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_post("/runsync", self.runsync)

    async def ping(self, request: web.Request) -> web.StreamResponse:
        status, reason = self.admission.health()
        if status == 503:
            return error_response(503, reason or "unhealthy", code="unhealthy")
        return web.Response(status=204) if status == 204 else web.json_response({"status": "healthy"})

    async def models(self, request: web.Request) -> web.Response:
        settings = self.worker.settings
        data = [] if settings is None else [
            {"id": settings.variant.repo, "object": "model", "created": STARTED, "owned_by": "Qwen"}]
        return web.json_response({"object": "list", "data": data})

    async def generations(self, request: web.Request) -> web.Response:
        raise ApiError(400, "this model edits pictures: it needs an input image. Call POST /v1/images/edits with "
                            "image and prompt (client.images.edit in the OpenAI SDK)", param="image",
                       code="image_required")

    async def edits(self, request: web.Request) -> web.Response:
        if request.content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise ApiError(400, f"send a multipart/form-data body, as the OpenAI SDK's images.edit does (got "
                                f"{request.content_type})")
        with self.admission.hold():
            form = await _read_form(request)
            settings = self.worker.settings
            variant = settings.variant if settings is not None else None
            try:
                call = openai_images.parse_form(form, variant, self.worker.bucket is not None)
            except RequestError as err:
                raise _api_error(err) from None
            job = {"id": f"lb-{uuid.uuid4().hex[:12]}", "input": call.job_input}
            upload = call.response_format == "url"
            output, err = await self.admission.execute(lambda: self.worker.attempt(job, upload=upload))
        self.admission.note(output)
        if err is not None:
            raise _api_error(err)
        return web.json_response(openai_images.images_response(output, call.response_format))

    async def runsync(self, request: web.Request) -> web.Response:
        """RunPod's queue answer for one job: {"id", "status": "COMPLETED", "output"} or "FAILED" with "error"."""
        arrived = time.perf_counter()
        with self.admission.hold():
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, 'the body must be JSON: {"input": {...}}') from None
            if not isinstance(body, dict) or "input" not in body:
                raise ApiError(400, 'the body must be a JSON object with "input" (the job input)', param="input")
            job: dict[str, Any] = {"id": f"sync-{uuid.uuid4()}", "input": body["input"]}
            if "s3Config" in body:
                job["s3Config"] = body["s3Config"]
            times: dict[str, float] = {}

            def work() -> tuple[dict[str, Any], Exception | None]:
                times["start"] = time.perf_counter()
                return self.worker.attempt(job)

            output, _ = await self.admission.execute(work)
        self.admission.note(output)
        answer: dict[str, Any] = {"id": job["id"], "delayTime": round((times["start"] - arrived) * 1000),
                                  "executionTime": round((time.perf_counter() - times["start"]) * 1000)}
        if "error" in output:
            return web.json_response({**answer, "status": "FAILED", "error": output["error"]})
        return web.json_response({**answer, "status": "COMPLETED", "output": output})


async def _read_form(request: web.Request) -> dict[str, list[Any]]:
    """The multipart form as field -> values (text, or (filename, bytes) for a file); aiohttp caps the body."""
    form: dict[str, list[Any]] = {}
    for name, value in (await request.post()).items():
        item = value if isinstance(value, str) else (value.filename, value.file.read())
        form.setdefault(name, []).append(item)
    return form


def _api_error(err: Exception) -> ApiError:
    status, param, code, message = openai_images.error_status(err)
    return ApiError(status, message, param=param, code=code)
