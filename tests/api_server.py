"""Start `python handler.py --rp_serve_api` (the RunPod SDK's local HTTP API) on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    env.update({"TINY_MODEL": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


@dataclass
class Api:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def serve_api(log_dir: Path, **env: str) -> Iterator[Api]:
    port = free_port()
    log_path = log_dir / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "handler.py"), "--rp_serve_api", "--rp_api_port", str(port),
             "--rp_api_host", "127.0.0.1"], cwd=ROOT, env=worker_env(**env), stdout=log, stderr=subprocess.STDOUT)
    api = Api(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"{api.url}/docs", timeout=1)
                break
            except requests.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:]) from None
                time.sleep(0.3)
        yield api
    finally:
        process.terminate()
        process.wait(timeout=30)
