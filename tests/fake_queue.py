"""A fake RunPod job queue on loopback, speaking the protocol the runpod 1.12 SDK speaks deployed.

Why this exists: a deployed worker is `python handler.py` with RUNPOD_WEBHOOK_* pointing at
RunPod's queue, and its behaviour under a burst (when it takes the next job, what it posts, how
it fails) lives in the SDK's job loop, not in our handler.  This server plays the queue so tests
and bench/throughput can run the worker exactly as deployed (facts.md section 9):

- GET  .../job-take/<worker>?...           one job `{"id", "input"}`, or 204 when empty
- GET  .../job-take-batch/<worker>?...&batch_size=N   a list of up to N jobs, or 204
- POST .../job-done/<worker>/<job>?...     `{"status": "IN_PROGRESS", "output"}` (progress) or the
                                           final `{"output"}` / `{"error"}` (`"stopPod"` with it)
- GET  .../job-stop/<worker>?...           the cancel long-poll: held briefly, then 204
- GET  .../ping/<worker>?...               the heartbeat (and the SDK's unhealthy report)

Every request is recorded with its time (time.monotonic) in `events`.  (tests/fake_runpod.py is
a different thing: RunPod's public endpoint API, for the client.)
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
WORKER_ID = "worker-1"
STOP_POLL_HOLD_S = 0.5


@dataclass
class Event:
    kind: str  # take, done, progress, ping, stop
    at: float
    job_id: str | None = None
    body: Any = None
    query: dict[str, list[str]] = field(default_factory=dict)


class FakeQueue:
    """The queue's state: jobs waiting, and every request the worker made."""

    def __init__(self) -> None:
        self.jobs: deque[dict[str, Any]] = deque()
        self.events: list[Event] = []
        self.lock = threading.RLock()  # re-entered by predicates passed to wait_for
        self.changed = threading.Condition(self.lock)
        self.url = ""

    def put(self, *jobs: dict[str, Any]) -> None:
        with self.lock:
            self.jobs.extend(jobs)

    def record(self, event: Event) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def of(self, kind: str, job_id: str | None = None) -> list[Event]:
        with self.lock:
            return [e for e in self.events if e.kind == kind and (job_id is None or e.job_id == job_id)]

    def results(self) -> dict[str, Event]:
        return {e.job_id: e for e in self.of("done") if e.job_id is not None}

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        """Wait until `predicate()` is true; raise TimeoutError naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake queue: {what} did not happen within {timeout:.0f} s")
                self.changed.wait(min(left, 0.5))

    def wait_done(self, job_ids: list[str], timeout: float) -> dict[str, Event]:
        def done() -> bool:
            finished = {e.job_id for e in self.events if e.kind == "done"}
            return set(job_ids) <= finished

        self.wait_for(done, timeout, f"results of {len(job_ids)} job(s)")
        return self.results()

    def env(self) -> dict[str, str]:
        """The variables RunPod sets in a deployed worker, pointing at this queue."""
        base = f"{self.url}/v2/fake-endpoint"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=fake",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=fake",
            "RUNPOD_POD_ID": WORKER_ID,
            "RUNPOD_ENDPOINT_ID": "fake-endpoint",
            "RUNPOD_AI_API_KEY": "fake-key",
            "RUNPOD_PING_INTERVAL": "1000",
        }


def _handler_class(queue: FakeQueue) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            route = parts.path.split("/")
            now = time.monotonic()
            if "job-take" in route or "job-take-batch" in route:
                count = int(query.get("batch_size", ["1"])[0]) if "job-take-batch" in route else 1
                with queue.lock:
                    taken = [queue.jobs.popleft() for _ in range(min(count, len(queue.jobs)))]
                for job in taken:
                    queue.record(Event("take", now, job["id"], query=query))
                if not taken:
                    time.sleep(0.05)  # RunPod holds the poll open a little; this keeps the loop from spinning
                    return self._reply(204)
                return self._reply(200, taken if "job-take-batch" in route else taken[0])
            if "job-stop" in route:
                time.sleep(STOP_POLL_HOLD_S)
                return self._reply(204)
            if "ping" in route:
                queue.record(Event("ping", now, body=self.headers.get("Authorization"), query=query))
                return self._reply(200, {})
            self._reply(404, {"error": f"no route {parts.path}"})

        def do_POST(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            route = parts.path.split("/")
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"null")
            if "job-done" not in route:
                return self._reply(404, {"error": f"no route {parts.path}"})
            job_id = route[-1]
            progress = isinstance(body, dict) and body.get("status") == "IN_PROGRESS"
            queue.record(Event("progress" if progress else "done", time.monotonic(), job_id, body,
                               parse_qs(parts.query)))
            self._reply(200, {})

        def _reply(self, status: int, body: Any = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def serve_queue() -> Iterator[FakeQueue]:
    """A FakeQueue served on a free loopback port (`queue.url`)."""
    queue = FakeQueue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(queue))
    server.daemon_threads = True
    queue.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield queue
    finally:
        server.shutdown()
        server.server_close()


def deployed_env(queue: FakeQueue, **extra: str) -> dict[str, str]:
    """This environment less any RUNPOD_* variable, plus the queue's, this checkout's src/, the tiny model
    and the SDK's start-up checks skipped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    path = [str(ROOT / "src"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update({"TINY_MODEL": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path),
                # the SDK's start-up checks need a GPU, 4 GB free and 8.8.8.8: none of them here
                "RUNPOD_SKIP_GPU_CHECK": "true", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true"})
    env.update(queue.env())
    env.update(extra)
    return env


@contextmanager
def deployed_worker(queue: FakeQueue, log_path: Path, command: list[str] | None = None,
                    **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`python handler.py` as RunPod starts it, against `queue`; always stopped (then killed) on exit."""
    argv = command or [sys.executable, str(ROOT / "handler.py")]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=deployed_env(queue, **env), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the worker's process group (the SDK's heartbeat is a child process), then SIGKILL."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group (the heartbeat process)
    except ProcessLookupError:
        pass
    process.wait(timeout=grace)
