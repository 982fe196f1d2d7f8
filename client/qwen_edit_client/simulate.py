"""A RunPod serverless endpoint, simulated job by job (simpy), billed as RunPod bills.

Why this exists: what an image costs depends less on the GPU than on the endpoint's settings:
idle seconds after each job and cold starts can cost more than the edit.  This module runs one
configuration over a list of jobs and returns what was billed and what callers waited.

The endpoint, as modelled (stated so it can be checked):
- Active workers are up from time 0 to the last job's end (or to `window_s`, if later: the period
  the jobs stand for, e.g. a day), never cold-start, and are billed all that time at the active
  price.  Billing them over the jobs' span alone assumes the traffic repeats.  They count toward
  max workers.
- A job that finds no free slot waits in one FIFO queue.  When the jobs waiting outnumber the
  free slots of workers already starting, a flex worker starts (up to max workers in all): it
  bills its cold start, then takes jobs.  Free slots take waiting jobs at once: active workers
  first, then flex workers in the order they started.
- A worker runs up to `concurrency` jobs at once, each at its own execution time (an upper bound
  on what concurrency buys; this worker runs one job at a time, so leave it at 1 unless measured).
- A flex worker with no job for `idle_timeout_s` stops.  It is billed from the start of its cold
  start until it stops, rounded up to the whole second (RunPod: "from when a worker starts until
  it fully stops, rounded up"); the rounding is reported on its own line.
- Latency = queue wait + cold-start wait + execution.  A job "waited for a cold start" when a
  worker took it the moment that worker finished starting.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import simpy

from .stats import summary

EPSILON = 1e-9  # seconds: float noise below this is not a billed second


@dataclass(frozen=True)
class Config:
    gpu: str
    flex_usd_s: float
    active_usd_s: float
    max_workers: int = 3
    active_workers: int = 0
    idle_timeout_s: float = 5.0
    cold_start_s: float = 5.0
    flashboot: bool = True  # a label: cold_start_s is already the FlashBoot or the plain figure
    concurrency: int = 1

    def check(self) -> None:
        if self.max_workers < 1:
            raise ValueError(f"--max-workers: must be 1 or more (got {self.max_workers})")
        if not 0 <= self.active_workers <= self.max_workers:
            raise ValueError(f"--active-workers: must be from 0 to max workers {self.max_workers} "
                             f"(got {self.active_workers})")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency: must be 1 or more (got {self.concurrency})")
        for name, value in (("--idle-timeout", self.idle_timeout_s), ("--cold-start", self.cold_start_s),
                            ("--price", self.flex_usd_s), ("--active-discount", self.active_usd_s)):
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"{name}: must be a finite number of 0 or more (got {value})")


@dataclass(frozen=True)
class Job:
    arrival_s: float
    execution_s: float
    images: int = 1


@dataclass
class _Worker:
    index: int
    active: bool
    started: float
    ready: float | None = None
    stopped: float | None = None
    running: int = 0
    busy_since: float = 0.0
    busy_s: float = 0.0
    idle_token: int = 0


@dataclass
class _Run:
    job: Job
    taken: float = math.nan
    done: float = math.nan
    cold: bool = False


@dataclass
class _Endpoint:
    config: Config
    env: simpy.Environment
    workers: list[_Worker] = field(default_factory=list)
    waiting: deque[_Run] = field(default_factory=deque)

    def arrive(self, run: _Run) -> Generator[simpy.Event, None, None]:
        yield self.env.timeout(run.job.arrival_s - self.env.now)
        self.waiting.append(run)
        self.dispatch()

    def dispatch(self) -> None:
        """Give waiting jobs to free slots, then start flex workers for what is still waiting."""
        slots = self.config.concurrency
        for worker in sorted((w for w in self.workers if w.ready is not None and w.stopped is None),
                             key=lambda w: (not w.active, w.index)):
            while self.waiting and worker.running < slots:
                self.env.process(self.execute(worker, self.waiting.popleft()))
                worker.running += 1
                if worker.running == 1:
                    worker.busy_since = self.env.now
                    worker.idle_token += 1
        starting = sum(1 for w in self.workers if w.ready is None)
        alive = sum(1 for w in self.workers if w.stopped is None)
        uncovered = len(self.waiting) - starting * slots
        while uncovered > 0 and alive < self.config.max_workers:
            worker = _Worker(len(self.workers), active=False, started=self.env.now)
            self.workers.append(worker)
            self.env.process(self.boot(worker))
            alive += 1
            uncovered -= slots

    def boot(self, worker: _Worker) -> Generator[simpy.Event, None, None]:
        yield self.env.timeout(self.config.cold_start_s)
        worker.ready = self.env.now
        self.dispatch()
        self.maybe_idle(worker)

    def execute(self, worker: _Worker, run: _Run) -> Generator[simpy.Event, None, None]:
        run.taken = self.env.now
        run.cold = not worker.active and worker.ready == self.env.now
        yield self.env.timeout(run.job.execution_s)
        run.done = self.env.now
        worker.running -= 1
        if worker.running == 0:
            worker.busy_s += self.env.now - worker.busy_since
        self.dispatch()
        self.maybe_idle(worker)

    def maybe_idle(self, worker: _Worker) -> None:
        if worker.running == 0 and not worker.active and worker.stopped is None:
            worker.idle_token += 1
            self.env.process(self.idle(worker, worker.idle_token))

    def idle(self, worker: _Worker, token: int) -> Generator[simpy.Event, None, None]:
        yield self.env.timeout(self.config.idle_timeout_s)
        if worker.idle_token == token and worker.running == 0:
            worker.stopped = self.env.now


def simulate(config: Config, jobs: Sequence[Job], window_s: float = 0.0) -> dict[str, Any]:
    """Run `jobs` (arrival times from 0) through an endpoint set up as `config`; return its bill."""
    config.check()
    env = simpy.Environment()
    endpoint = _Endpoint(config, env)
    endpoint.workers = [_Worker(i, active=True, started=0.0, ready=0.0) for i in range(config.active_workers)]
    runs = [_Run(job) for job in sorted(jobs, key=lambda j: j.arrival_s)]
    for run in runs:
        env.process(endpoint.arrive(run))
    env.run()
    end = max((run.done for run in runs), default=0.0)
    billed = {"execution": 0.0, "idle": 0.0, "cold_start": 0.0, "rounding": 0.0, "active": 0.0}
    active_busy = 0.0
    for worker in endpoint.workers:
        stop = max(end, window_s) if worker.active else worker.stopped
        assert stop is not None and worker.ready is not None, "every flex worker stops once the jobs are done"
        session = stop - worker.started
        rounded = math.ceil(session - EPSILON)
        if worker.active:
            billed["active"] += rounded
            active_busy += worker.busy_s
            continue
        billed["execution"] += worker.busy_s
        billed["cold_start"] += worker.ready - worker.started
        billed["idle"] += session - (worker.ready - worker.started) - worker.busy_s
        billed["rounding"] += rounded - session
    usd = {name: seconds * (config.active_usd_s if name == "active" else config.flex_usd_s)
           for name, seconds in billed.items()}
    usd["total"] = sum(usd.values())
    billed["total"] = sum(billed.values())
    images = sum(run.job.images for run in runs)
    latency = [run.done - run.job.arrival_s for run in runs]
    return {
        "config": asdict(config),
        "jobs": len(runs), "images": images,
        "usd_per_image": usd["total"] / images if images else None,
        "usd": usd, "billed_s": billed,
        "active_busy_s": active_busy,
        "latency_s": summary(latency),
        "queue_s": summary([run.taken - run.job.arrival_s for run in runs]),
        "cold_start_share": sum(run.cold for run in runs) / len(runs) if runs else None,
        "cold_starts": sum(1 for w in endpoint.workers if not w.active),
        "span_s": end, "active_billed_over_s": max(end, window_s) if config.active_workers else 0.0,
    }
