"""A loopback fake of RunPod's REST API v2, held to RunPod's own OpenAPI document.

tests/runpod_openapi_v2.json is runpod/docs `api-reference-v2/openapi.json` byte for byte, at commit
098c7fb0c6c374b1d053f896757a2282bf18e796 (2026-08-18, "docs(api-v2): sync API reference from Frontdoor
v2.9.0", the file's last change on the mirror's HEAD a900806e, 2026-08-20); OPENAPI_SHA256 pins it.

Every request body is validated against its operation's schema (`CreateEndpointRequest`,
`UpdateEndpointRequest`) with jsonschema's Draft202012Validator, $refs resolved inside the document
(it uses `unevaluatedProperties`, `if`/`then`, `oneOf`): a body that fails is answered 422 as
RunPod answers (a problem document, one `errors` line per failure) and kept in `invalid`.  Every
answer the fake gives, errors included, is validated against the operation's response schema
(kept in `bad_answers`), so the fake cannot drift from RunPod's shapes either.  Bearer auth is
checked (401).  Endpoints live in memory: POST creates (201), PATCH changes only what it is sent
(200; `pools` without `excludedTypes` clears them, `env` replaces the whole env), GET lists.  A
test can queue answers per route (`inject`): a status (400, 401, 403, 422, 429 with Retry-After,
500...) or "drop" (the connection closed without an answer), and `echo_key` puts the Authorization
header into error details (the client must scrub it).  Each endpoint's request URLs point at a
FakeRunPod queue (tests/fake_runpod.py) whose jobs a `worker` function answers with the endpoint's
env: the tests pass the real tiny worker (TINY_MODEL=1).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from fake_runpod import FakeRunPod
from loopback import LoopbackServer

OPENAPI = Path(__file__).with_name("runpod_openapi_v2.json")
OPENAPI_SHA256 = "b8bce61c5a2290d28a7cb2ed53173637166817249986cb18b101b2fd651fd313"
DOCUMENT = json.loads(OPENAPI.read_text())
URI = "urn:runpod-openapi-v2"
REGISTRY = Registry().with_resource(URI, Resource.from_contents(DOCUMENT, default_specification=DRAFT202012))
CREATED_AT = "2026-12-08T12:00:00Z"
# (GPU type id, display name, pool, GB, serverless USD per hour), after RunPod's docs (references/gpu-types.mdx)
# and facts.md's per-second prices x 3600 (the 4090's 1.1 is the OpenAPI document's own example).
GPUS = [
    ("NVIDIA RTX A4000", "RTX A4000", "AMPERE_16", 16, 0.58),
    ("NVIDIA L4", "L4", "AMPERE_24", 24, 0.69),
    ("NVIDIA RTX A5000", "RTX A5000", "AMPERE_24", 24, 0.69),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", "AMPERE_24", 24, 0.69),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", "ADA_24", 24, 1.1),
    ("NVIDIA RTX A6000", "RTX A6000", "AMPERE_48", 48, 1.22),
    ("NVIDIA A40", "A40", "AMPERE_48", 48, 1.22),
    ("NVIDIA L40S", "L40S", "ADA_48_PRO", 48, 1.91),
    ("NVIDIA L40", "L40", "ADA_48_PRO", 48, 1.91),
    ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada", "ADA_48_PRO", 48, 1.91),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe", "AMPERE_80", 80, 2.74),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM", "AMPERE_80", 80, 2.74),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", "ADA_80_PRO", 80, 4.18),
    ("NVIDIA H200", "H200 SXM", "HOPPER_141", 141, 5.58),
    ("NVIDIA GeForce RTX 3070", "RTX 3070", None, 8, None),  # not in a serverless pool: no serverless price
]


def validator(ref: str) -> Draft202012Validator:
    """A validator for a component of the document, e.g. "#/components/schemas/Endpoint"."""
    return Draft202012Validator({"$ref": f"{URI}{ref}"}, registry=REGISTRY,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def problems(ref: str, value: Any) -> list[str]:
    """RunPod-style lines ("$.gpu.pools: ...") for every way `value` fails the schema at `ref`; [] when it passes."""
    return [f"{error.json_path}: {error.message}" for error in validator(ref).iter_errors(value)]


ROUTES = {  # route -> (request schema or None, {status: response schema})
    "GET /v2/catalog/gpus": (None, {200: "ListGpuTypesResponse"}),
    "GET /v2/serverless": (None, {200: "ListEndpointsResponse"}),
    "POST /v2/serverless": ("CreateEndpointRequest", {201: "Endpoint"}),
    "PATCH /v2/serverless/{id}": ("UpdateEndpointRequest", {200: "Endpoint"}),
}
TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 422: "Unprocessable Entity",
          429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class FakeRunPodApi(LoopbackServer):
    METHODS = ("GET", "POST", "PATCH")

    def __init__(self, worker: Callable[[dict[str, str]], Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
                 key: str = "rpa_test_key") -> None:
        self.worker, self.key = worker, key
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, FakeRunPod] = {}
        self.inject: dict[str, list[int | str]] = {}  # route -> answers to give first: a status, or "drop"
        self.seen: list[tuple[str, str, int | str]] = []  # (method, path, status or "drop")
        self.bodies: list[tuple[str, str, Any]] = []  # (method, path, body) of every request with a body
        self.invalid: list[tuple[str, list[str]]] = []  # (route, problems): requests that failed RunPod's schema
        self.bad_answers: list[tuple[str, list[str]]] = []  # answers of the fake that failed RunPod's schema
        self.echo_key = False
        self._lock = threading.Lock()
        super().__init__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for queue in self.queues.values():
            queue.__exit__()

    def add(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create an endpoint as POST /v2/serverless would (a test's existing endpoint)."""
        assert not problems("#/components/schemas/CreateEndpointRequest", body)
        return self._create(body)

    # ---- serving ----

    def serve(self, req: http.server.BaseHTTPRequestHandler) -> None:
        path = req.path.split("?")[0].rstrip("/")
        parts = path.strip("/").split("/")
        route = f"{req.command} {path}"
        if len(parts) == 3 and parts[:2] == ["v2", "serverless"]:
            route = f"{req.command} /v2/serverless/{{id}}"
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        if body is not None:
            self.bodies.append((req.command, path, body))
        with self._lock:
            queued = self.inject.get(route)
            action = queued.pop(0) if queued else None
        if action == "drop":
            self.seen.append((req.command, path, "drop"))
            req.close_connection = True
            req.connection.shutdown(2)  # closed without an answer: the client sees a dropped connection
            return
        header = req.headers.get("Authorization", "")
        if header != f"Bearer {self.key}":
            detail = f"invalid bearer token {header!r}" if self.echo_key else "missing bearer token"
            return self._problem(req, route, 401, detail)
        if isinstance(action, int):
            detail = f"injected; the request carried {header!r}" if self.echo_key else "injected by the test"
            errors = ["$.gpu.pools[0]: value must be one of the serverless pools"] if action in (400, 422) else None
            return self._problem(req, route, action, detail, errors)
        if route not in ROUTES:
            return self._problem(req, route, 404, f"no route {route}")
        schema, _ = ROUTES[route]
        if schema is not None:
            found = problems(f"#/components/schemas/{schema}", body)
            if found:
                self.invalid.append((route, found))
                return self._problem(req, route, 422, "Request validation failed.", found)
        if route == "GET /v2/catalog/gpus":
            return self._answer(req, route, 200, {"gpus": [self._gpu(*g) for g in GPUS]})
        if route == "GET /v2/serverless":
            return self._answer(req, route, 200, {"endpoints": list(self.endpoints.values())})
        if route == "POST /v2/serverless":
            return self._answer(req, route, 201, self._create(body))
        endpoint = self.endpoints.get(parts[2])
        if endpoint is None:
            return self._problem(req, route, 404, "endpoint not found")
        return self._answer(req, route, 200, self._update(endpoint, body))

    def _answer(self, req: http.server.BaseHTTPRequestHandler, route: str, status: int, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> None:
        schema = ROUTES.get(route, (None, {}))[1].get(status, "ErrorResponse")
        found = problems(f"#/components/schemas/{schema}", body)
        if found:
            self.bad_answers.append((route, found))
        self.seen.append((req.command, req.path, status))
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json" if status < 400 else "application/problem+json")
        req.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(data)

    def _problem(self, req: http.server.BaseHTTPRequestHandler, route: str, status: int, detail: str,
                 errors: list[str] | None = None) -> None:
        body: dict[str, Any] = {"title": TITLES.get(status, "Error"), "status": status, "detail": detail}
        if errors:
            body["errors"] = errors
        self._answer(req, route, status, body, {"Retry-After": "0"} if status == 429 else None)

    # ---- the endpoints ----

    @staticmethod
    def _gpu(gpu_id: str, name: str, pool: str | None, gb: int, per_hour: float | None) -> dict[str, Any]:
        price: dict[str, float] = {"secure": 0.5, "community": 0.3}
        if per_hour is not None:
            price["serverless"] = per_hour
        return {"id": gpu_id, "name": name, "pool": pool, "manufacturer": "NVIDIA", "memory": gb, "secure": True,
                "community": pool is not None, "price": price, "maxCount": {"secure": 8, "community": 4}}

    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            endpoint_id = f"fake{len(self.endpoints):02d}ep"
        queue = self._queue(endpoint_id)
        base = f"{queue.url}/{endpoint_id}"
        urls = {"base": base, "health": f"{base}/ping"} if body["type"] == "LOAD_BALANCER" else {
            "run": f"{base}/run", "runSync": f"{base}/runsync", "status": f"{base}/status/{{job_id}}",
            "stream": f"{base}/stream/{{job_id}}", "cancel": f"{base}/cancel/{{job_id}}",
            "retry": f"{base}/retry/{{job_id}}", "purgeQueue": f"{base}/purge-queue", "health": f"{base}/health"}
        gpu = {"pools": [], "count": 1, "allowedCudaVersions": [], "minCudaVersion": None, **body["gpu"]}
        workers = {"min": 0, "max": 3, "idleTimeout": 10, **(body.get("workers") or {})}
        endpoint = {"id": endpoint_id, "name": body["name"], "type": body["type"], "requestUrls": urls,
                    "image": body["image"], "args": "", "disk": body.get("disk", 20), "ports": [],
                    "env": dict(body.get("env") or {}), "registry": None, "gpu": gpu, "workers": workers,
                    "scaling": body["scaling"], "dataCenterIds": [], "networkVolumes": [],
                    "timeout": body.get("timeout", 300_000), "flashboot": body.get("flashboot", "OFF"),
                    "createdAt": CREATED_AT}
        self.endpoints[endpoint_id] = endpoint
        return endpoint

    def _update(self, endpoint: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        for key in ("name", "image", "disk", "env", "timeout", "flashboot", "scaling"):
            if key in body:
                endpoint[key] = body[key]
        if "workers" in body:
            endpoint["workers"] = {**endpoint["workers"], **body["workers"]}
        if "gpu" in body:
            gpu = endpoint["gpu"]
            if "pools" in body["gpu"]:
                gpu.pop("excludedTypes", None)  # pools replace the selection: exclusions not restated are cleared
            gpu.update(body["gpu"])
            if gpu.get("minCudaVersion") == "":
                gpu["minCudaVersion"] = None
        return endpoint

    def _queue(self, endpoint_id: str) -> FakeRunPod:
        def handle(job: dict[str, Any]) -> dict[str, Any]:
            if self.worker is None:
                return {"error": "the fake API was started without a worker"}
            return self.worker(self.endpoints[endpoint_id]["env"])(job)

        queue = FakeRunPod(handle, endpoint=endpoint_id, key=self.key).__enter__()
        self.queues[endpoint_id] = queue
        return queue


def openapi_sha256() -> str:
    return hashlib.sha256(OPENAPI.read_bytes()).hexdigest()
