"""The GPU section: one job at a time on the model, on one thread, and how long each job waited.

Why this exists: with CONCURRENCY above 1 the worker holds more than one job, so that the next
job's pictures are fetched and decoded (and the last one's encoded and uploaded) while the GPU
works.  The model itself still runs one job at a time (two at once would only share the GPU and
double the memory), so a job may wait here, in the order it asked.  That wait is recorded in the
job's clock as `queue` and the time it held the section as `gpu`: the job's cost leaves the wait
out (the GPU was busy on, and billed to, the job ahead), and a benchmark can add up the `gpu`
times to see how busy the GPU was.

All model work runs on this section's one thread, whichever job thread asks: torch's CPU
allocations then stay in one malloc arena instead of one per job thread (with four threads the
local API's resident memory grew ~180 MB over 48 jobs; see tests/test_load.py), and the CUDA
context is used from one thread.  Pure: no torch import, so a benchmark's stand-in model can use it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ..accounting.timing import StageClock

T = TypeVar("T")


class GpuSection:
    """Runs work one call at a time on one thread, recording each call's wait (`queue`) and hold (`gpu`)."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")

    def run(self, clock: StageClock, work: Callable[[], T]) -> T:
        """Run `work` in the section once the calls ahead of it are done; return its result (or raise its error)."""
        asked = time.perf_counter()

        def timed() -> T:
            entered = time.perf_counter()
            clock.add("queue", entered - asked)
            try:
                return work()
            finally:
                clock.add("gpu", clock.now() - entered)

        return self._thread.submit(timed).result()
