"""`qwen-edit plan`: which endpoint settings make an image cheapest, for your traffic.

Why this exists: people size their endpoint by hand (workers x price x seconds per job) and miss
the idle and cold-start seconds RunPod also bills.  This module turns the command's inputs into
jobs (arrivals and execution times) and endpoint configurations, simulates each configuration
(simulate.py), and picks the cheapest one that meets a p95 latency target.

Arrivals: the submit times of one or more `qwen-edit edit` logs (merged on their clock, shifted
to start at 0), or `--rate N/h` (Poisson, seeded), or `--burst N` (all at 0).  Execution per job:
the logs' own figures (RunPod's executionTime, else the worker's timing), a fixed number of
seconds, or the GPU class's figure from catalog.py; the output says which.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import catalog, figures
from .simulate import Config, Job, simulate


class NoConfiguration(ValueError):
    """No configuration meets the p95 latency asked for."""


DEFAULT_GRID = {"idle_timeout_s": [1.0, 5.0, 15.0, 60.0], "max_workers": [1, 2, 3, 5], "active_workers": [0, 1]}


@dataclass(frozen=True)
class Arrival:
    at_s: float
    execution_s: float | None  # from a log; None for --rate and --burst
    execution_source: str | None
    images: int = 1


def from_logs(records: Sequence[dict[str, Any]]) -> tuple[list[Arrival], int]:
    """Jobs that reached a worker, at their submit times; and how many records were left out."""
    kept = []
    for record in records:
        execution, source = figures.execution_s(record)
        submitted = figures.when(record.get("submitted_at"))
        if submitted is not None and execution is not None:
            images = int((record.get("settings") or {}).get("num_images") or 1)
            kept.append((submitted, execution, source, images))
    if not kept:
        raise ValueError("LOG: no job in the logs reached a worker (no submit time with an execution time)")
    first = min(k[0] for k in kept)
    arrivals = [Arrival((at - first).total_seconds(), ex, src, n) for at, ex, src, n in kept]
    return sorted(arrivals, key=lambda a: a.at_s), len(records) - len(kept)


def poisson(rate_per_hour: float, jobs: int, seed: int) -> list[Arrival]:
    if not rate_per_hour > 0:
        raise ValueError(f"--rate: must be a number of jobs per hour above 0, like 120/h (got {rate_per_hour})")
    if jobs < 1:
        raise ValueError(f"--jobs: must be 1 or more (got {jobs})")
    rng, at, out = random.Random(seed), 0.0, []
    for index in range(jobs):
        if index:
            at += rng.expovariate(rate_per_hour / 3600)
        out.append(Arrival(at, None, None))
    return out


def burst(jobs: int) -> list[Arrival]:
    if jobs < 1:
        raise ValueError(f"--burst: must be 1 or more jobs (got {jobs})")
    return [Arrival(0.0, None, None) for _ in range(jobs)]


def parse_rate(text: str) -> float:
    """'120/h', '2/min', '0.5/s' or a bare number (per hour) -> jobs per hour."""
    number, _, unit = text.strip().partition("/")
    per = {"": 1.0, "h": 1.0, "hour": 1.0, "min": 60.0, "m": 60.0, "s": 3600.0}.get(unit.strip().lower())
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if per is None or not value > 0:
        raise ValueError(f"--rate: must be jobs per hour like 120/h (or N/min, N/s), above 0 (got {text!r})")
    return value * per


def arrivals(records: Sequence[dict[str, Any]] | None, logs: int, rate_per_hour: float | None, jobs: int, seed: int,
             burst_jobs: int | None = None) -> tuple[list[Arrival], str]:
    """The jobs' arrivals from exactly one of: log records (from `logs` files), a Poisson rate, a burst; and a
    line saying which."""
    if records is not None:
        found, left_out = from_logs(records)
        return found, f"{len(found)} jobs replayed from {logs} log(s)" + \
            (f" ({left_out} records that reached no worker left out)" if left_out else "")
    if rate_per_hour is not None:
        return poisson(rate_per_hour, jobs, seed), f"{jobs} jobs, Poisson at {rate_per_hour:g}/h (seed {seed})"
    if burst_jobs is None:
        raise ValueError("arrivals: give LOG files, --rate N/h or --burst N")
    return burst(burst_jobs), f"a burst of {burst_jobs} jobs at once"


@dataclass(frozen=True)
class Execution:
    mode: str  # "logs", "table" or "fixed"
    seconds: float | None = None  # for "fixed"

    @classmethod
    def parse(cls, text: str | None, have_logs: bool) -> Execution:
        if text is None:
            return cls("logs" if have_logs else "table")
        if text in ("logs", "table"):
            if text == "logs" and not have_logs:
                raise ValueError("--exec: 'logs' needs LOG files to replay")
            return cls(text)
        try:
            seconds = float(text)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:
            raise ValueError(f"--exec: must be 'logs', 'table' or seconds per job above 0 (got {text!r})")
        return cls("fixed", seconds)

    def jobs(self, arrivals: Sequence[Arrival], gpu: catalog.GpuClass) -> tuple[list[Job], str]:
        """The jobs for one GPU class, and a line saying where their execution times came from."""
        if self.mode == "logs":
            sources = Counter(a.execution_source for a in arrivals)
            said = ", ".join(f"{name}: {count}" for name, count in sources.items())
            return [Job(a.at_s, a.execution_s or 0.0, a.images) for a in arrivals], f"logs ({said})"
        if self.mode == "fixed":
            assert self.seconds is not None
            return [Job(a.at_s, self.seconds, a.images) for a in arrivals], f"fixed {self.seconds:g} s per job"
        if gpu.job_s is None:
            raise ValueError(f"--gpu: {gpu.name} ({gpu.runpod_class}) has no execution figure in "
                             f"{catalog.BENCHMARKS}; pass --exec SECONDS, or logs, or a class with one: "
                             f"{', '.join(catalog.with_figures())}")
        return ([Job(a.at_s, gpu.job_s, a.images) for a in arrivals],
                f"table: {gpu.name} {gpu.job_s:g} s, {gpu.job_source} ({catalog.BENCHMARKS}: {gpu.settings}) "
                f"{catalog.flops_label()}")


@dataclass(frozen=True)
class Grid:
    gpus: list[str]
    max_workers: list[int]
    active_workers: list[int]
    idle_timeouts_s: list[float]
    flashboot: list[bool]
    concurrency: int = 1
    cold_start_s: float = catalog.COLD_START_S
    flashboot_cold_start_s: float = catalog.FLASHBOOT_COLD_START_S
    price: float | None = None  # replaces every class's flex price
    active_discount: float | None = None  # replaces RunPod's published discount
    window_s: float = 0.0  # the period the jobs stand for: active workers bill at least this long

    def configs(self) -> list[Config]:
        if self.active_discount is not None and not 0 <= self.active_discount < 1:
            raise ValueError(f"--active-discount: must be a fraction from 0 to below 1, like 0.2 "
                             f"(got {self.active_discount})")
        out = []
        for name, top, active, idle, boot in itertools.product(self.gpus, self.max_workers, self.active_workers,
                                                              self.idle_timeouts_s, self.flashboot):
            if active > top:
                continue  # active workers count toward max workers: not a configuration RunPod accepts
            gpu = catalog.gpu_class(name)
            flex = gpu.flex_usd_s if self.price is None else self.price
            discount = gpu.published_discount if self.active_discount is None else self.active_discount
            out.append(Config(gpu.name, flex, flex * (1 - discount), top, active, idle,
                              self.flashboot_cold_start_s if boot else self.cold_start_s, boot, self.concurrency))
        if not out:
            raise ValueError("--active-workers: every value is above every --max-workers; nothing to simulate")
        return out


def run_plan(arrivals: Sequence[Arrival], execution: Execution, grid: Grid) -> list[dict[str, Any]]:
    results = []
    for config in grid.configs():
        jobs, source = execution.jobs(arrivals, catalog.gpu_class(config.gpu))
        result = simulate(config, jobs, grid.window_s)
        result["execution_source"] = source
        results.append(result)
    return sorted(results, key=lambda r: (r["usd_per_image"], r["latency_s"]["p95"]))


def recommend(results: Sequence[dict[str, Any]], p95_s: float | None) -> dict[str, Any] | None:
    """The cheapest configuration whose p95 latency is within p95_s (the cheapest of all without one)."""
    meeting = [r for r in results if p95_s is None or r["latency_s"]["p95"] <= p95_s]
    return min(meeting, key=lambda r: (r["usd_per_image"], r["latency_s"]["p95"]), default=None)


def format_plan(results: Sequence[dict[str, Any]], chosen: dict[str, Any] | None, p95_s: float | None,
                arrivals_said: str) -> str:
    def money(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.5f}"

    head = (f"{'':1}{'gpu':<10} {'max':>3} {'act':>3} {'idle s':>6} {'boot':>5} {'$/image':>9} {'p50 s':>7} "
            f"{'p95 s':>7} {'cold':>5} {'billed s':>9}  $ execution / idle / cold start / active")
    lines = [f"arrivals: {arrivals_said}", head]
    for r in results:
        c, usd = r["config"], r["usd"]
        lines.append(
            f"{'*' if r is chosen else ' '}{c['gpu']:<10} {c['max_workers']:>3} {c['active_workers']:>3} "
            f"{c['idle_timeout_s']:>6g} {c['cold_start_s']:>4g}s {money(r['usd_per_image']):>9} "
            f"{r['latency_s']['p50']:>7.1f} {r['latency_s']['p95']:>7.1f} {100 * (r['cold_start_share'] or 0):>4.0f}% "
            f"{r['billed_s']['total']:>9.0f}  {usd['execution']:.4f} / {usd['idle'] + usd['rounding']:.4f} / "
            f"{usd['cold_start']:.4f} / {usd['active']:.4f}")
    sources = sorted({r["execution_source"] for r in results})
    lines.append("execution: " + "; ".join(sources))
    over = sorted({r["active_billed_over_s"] for r in results if r["config"]["active_workers"]})
    if over:
        lines.append(f"active workers billed over {', '.join(f'{s:.0f}' for s in over)} s: the longer of the jobs' "
                     "span (as if the traffic repeats) and --window SECONDS (e.g. 86400 for a day)")
    lines.append("boot: the cold-start seconds used (FlashBoot or not); cold: jobs that waited for a worker to "
                 "start; idle includes the rounding up to whole seconds")
    if chosen is None:
        fastest = min(results, key=lambda r: r["latency_s"]["p95"])
        lines.append(f"no configuration meets p95 <= {p95_s:g} s; the fastest has p95 "
                     f"{fastest['latency_s']['p95']:.1f} s ({_describe(fastest)})")
    else:
        target = "" if p95_s is None else f" with p95 <= {p95_s:g} s"
        lines.append(f"recommended (*), the cheapest{target}: {_describe(chosen)}: ${chosen['usd_per_image']:.5f} "
                     f"per image, p95 {chosen['latency_s']['p95']:.1f} s")
    return "\n".join(lines)


def _describe(result: dict[str, Any]) -> str:
    c = result["config"]
    return (f"{c['gpu']}, max workers {c['max_workers']}, active workers {c['active_workers']}, idle timeout "
            f"{c['idle_timeout_s']:g} s, FlashBoot {'on' if c['flashboot'] else 'off'}, concurrency {c['concurrency']}")
