"""Start `ENDPOINT_TYPE=lb python handler.py` (the load-balancing front door) on free loopback ports.

Used by tests/test_lb.py and bench/throughput: the worker runs exactly as the image's CMD runs it on
a RunPod load-balancing endpoint, with PORT and PORT_HEALTH set, and `/ping` is polled from the
moment the process starts, so the caller sees every status it went through.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from api_server import ROOT, free_port, worker_env


@dataclass
class LbWorker:
    url: str  # the main port
    health_url: str  # PORT_HEALTH
    process: subprocess.Popen[bytes]
    log: Path
    pings: list[int] = field(default_factory=list)  # /ping statuses seen while starting (0: not listening yet)

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]

    def wait_ping(self, until: tuple[int, ...], timeout: float) -> int:
        """Poll /ping on PORT_HEALTH every 0.1 s until its status is one of `until`; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                status = requests.get(f"{self.health_url}/ping", timeout=5).status_code
            except requests.ConnectionError:
                status = 0
            if not self.pings or self.pings[-1] != status:
                self.pings.append(status)
            if status in until:
                return status
            time.sleep(0.1)
        raise TimeoutError(f"/ping never answered {until} (seen {self.pings}):\n{self.log_tail()}")


@contextmanager
def serve_lb(log_path: Path, separate_health: bool = True, command: list[str] | None = None,
             **env: str) -> Iterator[LbWorker]:
    """A load-balancing worker (tiny model unless `env` says otherwise; `command` replaces `python handler.py`,
    e.g. bench/standin.py); stopped on exit."""
    port = free_port()
    health = free_port() if separate_health else port
    settings = {"ENDPOINT_TYPE": "lb", "PORT": str(port), "PORT_HEALTH": str(health), **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command or [sys.executable, "handler.py"], cwd=ROOT, env=worker_env(**settings),
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield LbWorker(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health}", process, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
