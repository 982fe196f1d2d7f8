"""The GPU section: one job at a time on the model, and how long each job waited for it.

Why this exists: with CONCURRENCY above 1 the worker holds more than one job, so that the next
job's pictures are fetched and decoded (and the last one's encoded and uploaded) while the GPU
works.  The model itself still runs one job at a time (two at once would only share the GPU and
double the memory), so a job may wait here.  That wait is recorded in the job's clock as
`queue` and the time it held the section as `gpu`: the job's cost leaves the wait out (the GPU
was busy on, and billed to, the job ahead), and a benchmark can add up the `gpu` times to see
how busy the GPU was.  Pure: no torch import, so a benchmark's stand-in model can use it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .timing import StageClock


class GpuSection:
    """A lock around the model that records each job's wait (`queue`) and hold (`gpu`) times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, clock: StageClock) -> Iterator[None]:
        """Wait for the section, then hold it for the duration of the `with` block."""
        asked = time.perf_counter()
        with self._lock:
            entered = time.perf_counter()
            clock.add("queue", entered - asked)
            try:
                yield
            finally:
                clock.add("gpu", clock.now() - entered)
