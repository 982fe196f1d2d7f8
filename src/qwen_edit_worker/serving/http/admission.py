"""How many requests a load-balancing worker holds, and what its /ping says.

Why this exists: a load-balancing endpoint has no queue in front of the worker: RunPod sends each
request straight to a worker whose `GET /ping` answers 200, and a worker that holds more than it
can finish soon only makes callers wait while another worker is idle.  So a worker holds at most
CONCURRENCY running requests (the same count as the queue path: one on the GPU section, the
others reading or encoding pictures) plus LB_MAX_WAITING waiting, and refuses the next at once
(429, or 503 while the model is still loading) so the balancer and the client can go elsewhere.

/ping follows RunPod's health semantics: 204 while the model loads, 200 when it is ready (or, with
WARMUP=0, before the first request loads it), anything else unhealthy: 503 with the reason for a
bad setting, a model that cannot load, or a worker that ran out of GPU memory and asks to be
replaced.  The worker process never exits for any of these, so it is never restarted in a loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from ...settings import SETTINGS
from ..worker import Worker

T = TypeVar("T")


class Full(Exception):
    """The worker holds as many requests as it will; `loading` says whether the model is still loading."""

    def __init__(self, held: int, loading: bool) -> None:
        super().__init__(held)
        self.held, self.loading = held, loading


class Admission:
    """Holds up to CONCURRENCY running plus LB_MAX_WAITING waiting requests; runs each on a job thread."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        settings = worker.settings
        self.running = worker.concurrency()
        self.waiting = settings.lb_max_waiting if settings is not None else int(SETTINGS["LB_MAX_WAITING"][0])
        self.held = 0
        self.broken: str | None = None  # why this worker asks to be replaced (out of GPU memory, a machine fault)
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=self.running, thread_name_prefix="lb-job")

    @property
    def limit(self) -> int:
        return self.running + self.waiting

    def loading(self) -> bool:
        model = self.worker.model
        return model.started and not model.ready

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a place for one request while the block runs, or raise Full at once."""
        with self._lock:
            if self.held >= self.limit:
                raise Full(self.held, self.loading())
            self.held += 1
        try:
            yield
        finally:
            with self._lock:
                self.held -= 1

    async def execute(self, work: Callable[[], T]) -> T:
        """Run `work` on one of the CONCURRENCY job threads (the GPU section inside orders the model work)."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, work)

    def health(self) -> tuple[int, str | None]:
        """(/ping's status, the reason when it is 503)."""
        worker = self.worker
        if worker.settings_error is not None:
            return 503, f"bad setting: {worker.settings_error}"
        if self.broken is not None:
            return 503, self.broken
        model = worker.model
        if not model.started:
            return 200, None  # WARMUP=0: the first request loads the model
        if not model.ready:
            return 204, None
        if model.error is not None:
            return 503, f"the model cannot load: {model.error}"
        return 200, None

    def note(self, output: dict[str, Any]) -> None:
        """After a job: a worker that asked to be refreshed (out of GPU memory, a model that failed to load for a
        cause of this machine) turns unhealthy."""
        if output.get("refresh_worker"):
            self.broken = f"this worker asks to be replaced: {output.get('error', 'out of GPU memory')}"

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
