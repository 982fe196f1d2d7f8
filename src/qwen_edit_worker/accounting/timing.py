"""Stage timing for a job: where each millisecond went.

Why this exists: what an edit costs is the GPU's price per second times the job's seconds, so
people need to see every stage (inputs, request LoRAs (fetch and activation), text encoding,
VAE encoding, denoising, decoding, the safety check, outputs), plus `queue`, the time a job waited for the GPU while
the job ahead of it ran (CONCURRENCY above 1), which its cost leaves out.  GPU work is asynchronous, so on CUDA the
clock is read only after synchronising (`sync`), otherwise a stage's time would land in
whichever later stage waits for the GPU.  Pure: the synchronise function is injected; no torch import here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# The parts of a job's time, in order; they do not overlap, so they add up to no more than the total.
STAGES = ("inputs", "lora", "queue", "text_encode", "vae_encode", "denoise", "decode", "safety", "outputs")


class StageClock:
    """Accumulates named stage durations in seconds; one instance per job."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync
        self.started = self.now()
        self.seconds: dict[str, float] = {}
        self.marks: dict[str, float] = {}

    def set_sync(self, sync: Callable[[], None]) -> None:
        """Synchronise the device before every later reading (set once the model's device is known)."""
        self._sync = sync

    def now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.add(name, self.now() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def mark(self, name: str) -> None:
        """Record a point in time (e.g. the end of the last denoising step)."""
        self.marks[name] = self.now()

    def elapsed(self) -> float:
        return self.now() - self.started

    def ms(self, name: str) -> float:
        return round(self.seconds.get(name, 0.0) * 1000, 2)


def timing_report(clock: StageClock, *, cold_start: bool, load_seconds: float, steps: int) -> dict[str, object]:
    """The job output's `timing` block.

    `load_ms` is the time this job waited for the model to load; `queue_ms` the time it waited for
    the job ahead to leave the GPU; `gpu_ms` the time it held the GPU section (it overlaps the
    model's stages, so it is not one of them).
    """
    total = clock.elapsed()
    report: dict[str, object] = {"cold_start": cold_start, "load_ms": round(load_seconds * 1000, 2)}
    report.update({f"{name}_ms": clock.ms(name) for name in STAGES})
    report["gpu_ms"] = clock.ms("gpu")
    report["total_ms"] = round(total * 1000, 2)
    report["steps"] = steps
    report["ms_per_step"] = round(clock.ms("denoise") / steps, 2) if steps else 0.0
    return report


def billed_seconds(clock: StageClock) -> float:
    """The seconds a job is charged for: its time so far less the time it waited for the GPU.

    While a job waits in the queue, the job ahead of it holds the GPU and is charged for those
    seconds; counting them twice would make jobs look dearer the more of them a worker holds.
    """
    return max(clock.elapsed() - clock.seconds.get("queue", 0.0), 0.0)


def process_seconds() -> float:
    """Seconds since this process started (Linux: its start time in /proc, at the kernel's clock-tick
    resolution); elsewhere, since this module was first imported.  The load log's timeline uses it, so a
    cold start's steps read against the moment the container ran `python`."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the comm field
            return float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
