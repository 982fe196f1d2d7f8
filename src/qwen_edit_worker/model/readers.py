"""How many readers bring the weights into the page cache at start: chosen from the host, or READAHEAD_READERS.

Why this exists: the read-ahead (model/readahead.py) is what makes a cold start cost the disk's time, and
how fast a disk delivers depends on how many reads are in flight.  One number cannot suit every host: a
RunPod GPU host gives a container 8-32 cores and an NVMe that needs many reads in flight to reach its rate
(run:ai's model streamer reads with 16 threads for file systems by default, 47.6 s at 1 thread against 14.3 s
at 16 for 15 GB on a 1 GB/s volume; fal's FlashPack with 16: facts.md section 13), while on a small host the
kernel's work for each reader's page faults (and the process's mmap lock, which the imports running beside
them also take) can come out of the imports' share.
The rule, `rule(cpus)`: PER_CPU readers for each CPU the process may use, at most MAX_READERS.
- PER_CPU (4): measured on this project's 2-core VM (bench/coldstart --real-shape --readers, int8 layout,
  6.1 GB, four interleaved runs; docs/benchmarks.md): the worker's read-ahead gains up to 4-8 readers (8:
  1.28-1.40x as fast as one, 1.07-1.33x as fast as two), and the imports beside them were no slower at any
  count up to 16 than beside one or two (medians within the shared machine's noise).  16 read little faster
  than 8 (3.7-3.9 s against 3.95-4.6), so nothing measured says more than 4 a CPU pays on a small host, and
  the rule stays at the counts measured clean.  Below one CPU's worth: 4 (derived, not measured).
- MAX_READERS (16): the field's default for file systems (run:ai, FlashPack); a GPU host (8-32 cores)
  gets it.  Whether its NVMe gains beyond 16 is not measured here.
"CPUs the process may use" is the smaller of its affinity (os.sched_getaffinity: the cores it may run on)
and its cgroup CPU quota rounded up (a container on a shared GPU host often sees every core of the host
but may use only its quota: cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`, the
smallest along its cgroup and the cgroups above it).  READAHEAD_READERS overrides the rule.
Pure: no torch.  Nothing here raises: what cannot be read counts as no limit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PER_CPU = 4
MAX_READERS = 16
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Cpus:
    """The CPUs this process may use: its affinity, and its cgroup quota in CPUs (None: no quota)."""

    affinity: int
    quota: float | None = None

    @property
    def usable(self) -> int:
        """The smaller of the two, the quota rounded up (a reader mostly waits on the disk), at least 1."""
        quota = self.affinity if self.quota is None else math.ceil(self.quota)
        return max(1, min(self.affinity, quota))

    def describe(self) -> str:
        quota = "no cgroup CPU quota" if self.quota is None else f"cgroup CPU quota {self.quota:g}"
        return f"{self.usable} CPUs usable (affinity {self.affinity}, {quota})"


@dataclass(frozen=True)
class ReaderCount:
    """How many readers, and where that number came from (for the log line that starts the read-ahead)."""

    count: int
    source: str


def rule(cpus: int) -> int:
    """PER_CPU readers a usable CPU (at least one CPU counted), at most MAX_READERS (the module docstring says why)."""
    return min(MAX_READERS, PER_CPU * max(1, cpus))


def choose(override: int | None, cpus: Cpus | None = None) -> ReaderCount:
    """READAHEAD_READERS when set (`override`), else the rule on `cpus` (default: this process's)."""
    if override is not None:
        return ReaderCount(override, f"READAHEAD_READERS={override}")
    cpus = cpus or host_cpus()
    return ReaderCount(rule(cpus.usable), f"auto: {cpus.describe()}; {PER_CPU} a CPU, at most {MAX_READERS}")


def host_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Cpus:
    """This process's affinity and cgroup CPU quota."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    return Cpus(affinity, cgroup_quota(root, proc_cgroup))


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota (in CPUs) over this process's cgroup and the ones above it, the smallest; None when none.

    /proc/self/cgroup names the process's cgroup: `0::/path` (v2, the hierarchy at `root`) or
    `N:cpu,cpuacct:/path` (v1, at `root/cpu,cpuacct` or `root/cpu`).  Inside a container the path may be the
    host's while `root` is the container's own cgroup, so every folder from the path up to `root` is tried.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    found: list[float] = []
    for line in lines or ["0::/"]:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            bases, read = [root], _read_v2
        elif "cpu" in controllers.split(","):
            bases, read = [root / controllers, root / "cpu"], _read_v1
        else:
            continue
        for base in bases:
            for folder in _up_from(base, path):
                quota = read(folder)
                if quota is not None:
                    found.append(quota)
    return min(found, default=None)


def _up_from(base: Path, path: str) -> list[Path]:
    relative = PurePosixPath(path.strip() or "/").relative_to("/")
    return [base / part for part in (relative, *relative.parents)]


def _read_v2(folder: Path) -> float | None:
    """cgroup v2 `cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD" (no limit)."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):
        return None


def _read_v1(folder: Path) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
