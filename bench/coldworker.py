"""One deployed-like worker process started on a model folder and timed to "model ready", then stopped.

Why this exists: the cold start that matters is a new process (imports included) loading through the
worker's own load path, so this starts `handler.py --rp_serve_api` exactly as bench/coldstart always
has (the RunPod SDK's local API on loopback; its automatic system checks, which reach 8.8.8.8, are
skipped, so nothing leaves the machine) and watches it from outside:
- `ready_s`: just before Popen to the moment its "model ready" log line is read;
- the worker's own "load timeline: {json}" line, when it logs one (seconds since its process started);
- every log line with the second it arrived (where the time goes, whatever the worker logs);
- sampled every SAMPLE_S: how much of the folder is in the page cache (the bytes read so far, since the
  cache was dropped just before the start), and the process's RSS (anonymous and file-backed);
- its peak RSS (VmHWM) just before it is stopped (terminate, then kill: never left running);
- how much of each component was in the page cache once it had stopped: what the load really read.  A
  tensor left backed by safetensors' file mapping (int8 weights on a CPU are) is read only when first used,
  so "ready" can come before the last byte is read; on a GPU the copy to the device reads everything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import benchlib
import pagecache

READY, FAILED, TIMELINE = "model ready", "model load failed", "load timeline: "
SAMPLE_S = 0.5
KEPT_LINES = 80  # log lines kept in the result (the first ones: the load's story), progress bars left out
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar ("Loading weights:  45%|...")
# The SDK must never send traffic off this machine (facts.md section 12); no hub is asked either.
QUIET_ENV = {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


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
    """Samples the folder's page-cache residency and the process's memory while it loads."""

    def __init__(self, pid: int, paths: Sequence[Path], started: float) -> None:
        self.pid, self.paths, self.started = pid, list(paths), started
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            memory = status(self.pid)
            try:
                resident = sum(pagecache.resident_bytes(p) for p in self.paths)
            except OSError:
                continue
            self.samples.append({"t": round(time.perf_counter() - self.started, 2), "folder_resident_gb":
                                 round(resident / 1e9, 3), "rss_gb": round(memory.get("VmRSS", 0) / 1e9, 3),
                                 "anon_gb": round(memory.get("RssAnon", 0) / 1e9, 3)})

    def read_milestones(self, total: int) -> dict[str, float | None]:
        """Seconds until 1%, 50%, 90% and 99% of the folder had come into the page cache (observed, sampled)."""
        out: dict[str, float | None] = {}
        for share in (0.01, 0.5, 0.9, 0.99):
            hit = next((s["t"] for s in self.samples if s["folder_resident_gb"] * 1e9 >= share * total), None)
            out[f"folder_read_{round(share * 100)}pct_s"] = hit
        return out


def run(folder: Path, variant: str, port: int, settings: Mapping[str, str], paths: Sequence[Path],
        timeout_s: float = 3600) -> dict[str, Any]:
    """Start the worker on `folder`, wait for "model ready", stop it; the measurements."""
    env = {"MODEL_PATH": str(folder), "MODEL_VARIANT": variant, "WARMUP": "1", "LOG_LEVEL": "INFO",
           "PYTHONUNBUFFERED": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **QUIET_ENV, **settings}
    lines: list[tuple[float, str]] = []
    progress: list[tuple[float, str]] = []
    ready_at: list[float] = []
    done = threading.Event()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(benchlib.ROOT / "handler.py"), "--rp_serve_api",
                                "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"], cwd=benchlib.ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def follow() -> None:  # reads to the end, so a chatty worker never blocks on a full pipe
        assert process.stdout is not None
        for line in process.stdout:
            now = time.perf_counter() - started
            if line.strip() and not PROGRESS.search(line):
                lines.append((now, line.rstrip()))
            elif PROGRESS.search(line) and not progress:
                progress.append((now, line.strip()))  # the first bar's first line: where reading began
            if (READY in line or FAILED in line) and not ready_at:
                ready_at.append(now)
                done.set()
        done.set()

    reader = threading.Thread(target=follow, daemon=True)
    peak: dict[str, int] = {}
    with Watcher(process.pid, paths, started) as watcher:
        reader.start()
        try:
            done.wait(timeout_s)
            peak = status(process.pid)
        finally:
            stop(process)
    reader.join(10)
    resident_after = {}  # what the load read of each component (the cache was dropped before it started)
    for path in paths:
        top = path.relative_to(folder).parts
        key = top[0] if len(top) > 1 else "other"
        resident_after[key] = resident_after.get(key, 0) + pagecache.resident_bytes(path)
    failed = next((text for _, text in lines if FAILED in text), None)
    if failed or not ready_at:
        tail = "\n".join(text for _, text in lines[-20:])
        raise SystemExit(f"the worker was not ready ({'load failed' if failed else 'exited or timed out'}):\n{tail}")
    timeline = next((parse_timeline(text) for _, text in lines if TIMELINE in text), None)
    total = sum(p.stat().st_size for p in paths)
    return {"ready_s": round(ready_at[0], 2), "timeline": timeline, "exit_code": process.returncode,
            "peak_rss_gb": round(peak.get("VmHWM", 0) / 1e9, 2),
            "peak_anon_gb_sampled": max((s["anon_gb"] for s in watcher.samples), default=None),
            **watcher.read_milestones(total), "samples": watcher.samples,
            "folder_read_gb_at_ready": {k: round(v / 1e9, 3) for k, v in sorted(resident_after.items())},
            "folder_read_fraction_at_ready": round(sum(resident_after.values()) / total, 3) if total else None,
            "log": [f"{t:7.2f}s {text}" for t, text in sorted(lines[:KEPT_LINES] + progress)]}


def parse_timeline(line: str) -> dict[str, Any] | None:
    """The JSON object after "load timeline: " (None when it is not one)."""
    try:
        value = json.loads(line.split(TIMELINE, 1)[1])
    except (IndexError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def stop(process: subprocess.Popen[str], grace_s: float = 30) -> None:
    """terminate, wait, then kill: the worker never outlives the measurement."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace_s)
