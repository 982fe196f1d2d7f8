"""A process and its children watched from outside: peak anonymous memory, peak RSS, sampled every 0.1 s.

Why this exists: what must fit in a build machine's RAM is the bake's anonymous memory (heap, tensors);
the pages of files it maps (safetensors) are page cache the kernel can drop and re-read, which RSS counts
too.  So both are sampled, summed over the process tree (bake.py's preparation runs in one process today;
a helper process would count), from /proc/<pid>/status (RssAnon, VmRSS) every SAMPLE_S.  A sample can
miss a peak shorter than SAMPLE_S; the process's own high-water mark (VmHWM, all of RSS) is read at the end
by the child itself (bench/bakerun.py) and is never below the sampled RSS of one process.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

SAMPLE_S = 0.1


def tree(pid: int) -> list[int]:
    """`pid` and every descendant (through /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                todo += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of `pid` in bytes (empty once it has exited)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class Watcher:
    """`with Watcher(pid) as w:` samples the tree until the block ends; then `w.result()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_anon = self.peak_rss = 0
        self.samples = 0
        self.timeline: list[tuple[float, float]] = []  # (seconds, anonymous GB), one point a second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.perf_counter()

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = -1.0
        while not self._stop.is_set():
            anon = rss = 0
            for pid in tree(self.pid):
                sample = status(pid)
                anon, rss = anon + sample.get("RssAnon", 0), rss + sample.get("VmRSS", 0)
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            self.samples += 1
            now = time.perf_counter() - self._started
            if now - last >= 1.0:
                self.timeline.append((round(now, 1), round(anon / 1e9, 2)))
                last = now
            self._stop.wait(SAMPLE_S)

    def result(self) -> dict[str, Any]:
        return {"peak_anon_gb": round(self.peak_anon / 1e9, 2), "peak_rss_gb": round(self.peak_rss / 1e9, 2),
                "samples": self.samples, "sample_s": SAMPLE_S}
