"""The load-balancing endpoint's HTTP server: `python handler.py` with ENDPOINT_TYPE=lb.

Why this exists: a RunPod load-balancing endpoint sends HTTP straight to a server in the worker,
on `PORT`, and probes `GET /ping` on `PORT_HEALTH` (both default to 80 on RunPod; PORT_HEALTH
defaults to PORT).  This module starts that server (aiohttp, which the runpod SDK already brings)
beside the model's background load, and puts in front of every route what they all share:
`API_KEY` (when set, every route but /ping needs `Authorization: Bearer <key>`), the 30 MB body
limit RunPod's balancer has (413), the admission limit (429, or 503 while loading), and OpenAI's
error shape for every refusal, a traceback never leaving the log.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from ...settings import SETTINGS
from ..worker import Worker
from .admission import Admission, Full
from .errors import ApiError, error_response
from .routes import Routes

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 30_000_000  # RunPod's load balancer takes request bodies up to 30 MB
RETRY_AFTER_S = "2"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(worker: Worker, admission: Admission, health_only: bool = False) -> web.Application:
    """The aiohttp app: every route (or /ping alone, for a separate PORT_HEALTH) behind the shared middleware."""
    settings = worker.settings
    key = settings.api_key if settings is not None else ""

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if key and request.path != "/ping":
                _authorise(request.headers.get("Authorization", ""), key)
            if (request.content_length or 0) > MAX_BODY_BYTES:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
            return await handler(request)
        except ApiError as err:
            return err.response()
        except Full as full:
            return _full(full, admission)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"the request body is over {MAX_BODY_BYTES / 1e6:g} MB (RunPod's load "
                                       "balancer's limit): send smaller pictures", code="request_too_large")
        except web.HTTPException as err:
            if err.status < 400:
                raise
            reason = f"Invalid URL ({request.method} {request.path})" if err.status == 404 else err.reason
            return error_response(err.status, reason)
        except Exception as err:  # never a traceback to the caller
            log.exception("%s %s failed with an internal error", request.method, request.path)
            return error_response(500, f"internal error ({type(err).__name__}); details are in the worker log")

    app = web.Application(middlewares=[front], client_max_size=MAX_BODY_BYTES)
    routes = Routes(worker, admission)
    if health_only:
        app.router.add_get("/ping", routes.ping)
    else:
        routes.add_to(app)
    return app


def ports(worker: Worker) -> tuple[int, int]:
    """(PORT, PORT_HEALTH); with bad settings, RunPod's defaults where the environment has no usable number."""
    if worker.settings is not None:
        return worker.settings.port, worker.settings.port_health
    port = _env_port("PORT", int(SETTINGS["PORT"][0]))
    return port, _env_port("PORT_HEALTH", port)


def serve(worker: Worker) -> int:
    """Serve until the process is stopped (the model keeps loading in the background meanwhile)."""
    asyncio.run(_serve(worker))
    return 0


async def _serve(worker: Worker) -> None:
    admission = Admission(worker)
    port, health_port = ports(worker)
    runners = [web.AppRunner(build_app(worker, admission), access_log=None)]
    if health_port != port:
        runners.append(web.AppRunner(build_app(worker, admission, health_only=True), access_log=None))
    for runner, number in zip(runners, (port, health_port), strict=False):
        await runner.setup()
        await web.TCPSite(runner, host="0.0.0.0", port=number).start()
    log.info("load-balancing endpoint: serving on port %d (GET /ping on %d); holds %d running + %d waiting",
             port, health_port, admission.running, admission.waiting)
    try:
        await asyncio.Event().wait()
    finally:
        admission.close()
        for runner in runners:
            await runner.cleanup()


def _authorise(header: str, key: str) -> None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or incorrect API key: send Authorization: Bearer <API_KEY>",
                       code="invalid_api_key")


def _full(full: Full, admission: Admission) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S}
    log.info("refused a request: the worker holds %d, its limit%s", full.held, " (loading)" if full.loading else "")
    if full.loading:
        return error_response(503, "the model is still loading and this worker holds as many requests as it will "
                                   f"({admission.limit}); retry shortly", code="model_loading", headers=headers)
    return error_response(429, f"this worker holds as many requests as it will ({admission.running} running + "
                               f"{admission.waiting} waiting: CONCURRENCY and LB_MAX_WAITING); retry, or another "
                               "worker will take it", code="rate_limit_exceeded", headers=headers)


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else default
