"""A small local server that speaks RunPod's serverless endpoint API, for testing the client.

/v2/{endpoint}/run, /v2/{endpoint}/runsync and GET /v2/{endpoint}/status/{id}, with the Bearer key
checked (401), unknown endpoints (404), a status progression IN_QUEUE -> IN_PROGRESS -> COMPLETED or
FAILED, known delayTime/executionTime, and injectable 429/5xx answers.  The jobs' outputs come from
a real tiny worker, so the client handles exactly what a worker returns.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any

from loopback import LoopbackServer

DELAY_MS, EXECUTION_MS = 1234, 2345


class FakeRunPod(LoopbackServer):
    def __init__(self, handle: Callable[[dict[str, Any]], dict[str, Any]], endpoint: str = "ep-test",
                 key: str = "rpa_test_key") -> None:
        self.handle, self.endpoint, self.key = handle, endpoint, key
        self.jobs: dict[str, dict[str, Any]] = {}
        self.inject: dict[str, list[int]] = {}  # route ("run", "status", "runsync") -> status codes to answer first
        self.seen: list[tuple[str, str, int]] = []  # (method, route, answered status)
        self.statuses: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.auth_headers: set[str] = set()
        self._lock = threading.Lock()
        super().__init__()
        self.url += "/v2"

    def _answer(self, req: http.server.BaseHTTPRequestHandler, route: str, status: int, body: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append((req.command, route, status))
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def serve(self, req: http.server.BaseHTTPRequestHandler) -> None:
        parts = req.path.strip("/").split("/")  # v2, endpoint, route[, id]
        route = parts[2] if len(parts) > 2 else ""
        self.auth_headers.add(req.headers.get("Authorization", ""))
        length = int(req.headers.get("Content-Length") or 0)
        payload = json.loads(req.rfile.read(length) or b"{}") if length else {}
        if req.headers.get("Authorization") != f"Bearer {self.key}":
            return self._answer(req, route, 401, {"error": "Unauthorized"})
        if len(parts) < 3 or parts[1] != self.endpoint:
            return self._answer(req, route, 404, {"error": "endpoint not found"})
        with self._lock:
            codes = self.inject.get(route)
            code = codes.pop(0) if codes else None
        if code:
            return self._answer(req, route, code, {"error": "busy"})
        if route == "runsync" and req.command == "POST":
            return self._answer(req, route, 200, self._finish({"id": f"sync-{len(self.jobs)}", "job": payload}))
        if route == "run" and req.command == "POST":
            with self._lock:
                job_id = f"job-{len(self.jobs)}"
                self.jobs[job_id] = {"id": job_id, "job": payload, "polls": 0}
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._answer(req, route, 200, {"id": job_id, "status": "IN_QUEUE"})
        if route == "status" and req.command == "GET" and len(parts) == 4 and parts[3] in self.jobs:
            job = self.jobs[parts[3]]
            job["polls"] += 1
            if job["polls"] <= 2:
                status = "IN_QUEUE" if job["polls"] == 1 else "IN_PROGRESS"
                self.statuses.append(status)
                return self._answer(req, route, 200, {"id": job["id"], "status": status})
            if "result" not in job:
                job["result"] = self._finish(job)
                with self._lock:
                    self.in_flight -= 1
            self.statuses.append(job["result"]["status"])
            return self._answer(req, route, 200, job["result"])
        return self._answer(req, route, 404 if route == "status" else 405, {"error": "no such route"})

    def _finish(self, job: dict[str, Any]) -> dict[str, Any]:
        result = self.handle({"id": job["id"], **job["job"]})
        body: dict[str, Any] = {"id": job["id"], "delayTime": DELAY_MS, "executionTime": EXECUTION_MS}
        if "error" in result:
            return body | {"status": "FAILED", "error": result["error"]}
        return body | {"status": "COMPLETED", "output": result}
