"""One deployed-like worker process started on a model folder and timed to "model ready", then stopped.

Why this exists: the cold start that matters is a new process (imports included) loading through the
worker's own load path, so this starts `handler.py --rp_serve_api` exactly as bench/coldstart always
has (the RunPod SDK's local API on loopback; its automatic system checks, which reach 8.8.8.8, are
skipped, so nothing leaves the machine) and watches it from outside:
- `ready_s`: just before Popen to the moment its "model ready" log line is read;
- the worker's own "load timeline: {json}" line, when it logs one (seconds since its process started);
- every log line with the second it arrived (where the time goes, whatever the worker logs);
- sampled every SAMPLE_S: the bytes it has read from storage (/proc/<pid>/io read_bytes: the folder, since
  its cache was dropped just before the start, and any library not already cached), how much of each
  component is in the page cache, and the process's RSS (anonymous and file-backed);
- its peak RSS (VmHWM) just before it is stopped (terminate, then kill: never left running);
- what the load really read by "model ready" (read_bytes over the folder's bytes; per component, the most
  of it seen in the page cache).  A
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
from procwatch import status

READY, FAILED, TIMELINE = "model ready", "model load failed", "load timeline: "
SAMPLE_S = 0.5
SHARES = (0.01, 0.5, 0.9, 0.99)
TIMELINE_WAIT_S = 5.0  # how long after "model ready" the "load timeline:" line may take (a worker without one: all)
KEPT_LINES = 80  # log lines kept in the result (the first ones: the load's story), progress bars left out
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar ("Loading weights:  45%|...")
# The SDK must never send traffic off this machine (facts.md section 12); no hub is asked either.
QUIET_ENV = {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


def io_read_bytes(pid: int) -> int | None:
    """Bytes `pid` has had read from storage (its threads together; mmap page faults included)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Watcher:
    """Samples, while the worker loads: the bytes it has read from storage, how much of each component is in
    the page cache (the most seen: under memory pressure the kernel evicts what was read), and its memory."""

    def __init__(self, pid: int, folder: Path, paths: Sequence[Path], started: float) -> None:
        self.pid, self.folder, self.paths, self.started = pid, folder, list(paths), started
        self.samples: list[dict[str, float]] = []
        self.most_resident: dict[str, int] = {}
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
            memory, read = status(self.pid), io_read_bytes(self.pid)
            try:
                resident = component_residency(self.folder, self.paths)
            except OSError:
                continue
            for name, size in resident.items():
                self.most_resident[name] = max(size, self.most_resident.get(name, 0))
            self.samples.append({"t": round(time.perf_counter() - self.started, 2),
                                 "io_read_gb": None if read is None else round(read / 1e9, 3),
                                 "folder_resident_gb": round(sum(resident.values()) / 1e9, 3),
                                 "rss_gb": round(memory.get("VmRSS", 0) / 1e9, 3),
                                 "anon_gb": round(memory.get("RssAnon", 0) / 1e9, 3)})

    def read_milestones(self, total: int) -> dict[str, float | None]:
        """Seconds until 1%, 50%, 90% and 99% of the folder's bytes had been read (sampled).

        Read so far = the most of the folder seen in the page cache until then, or, once larger, the process's
        read_bytes (which never falls when the kernel evicts, but also counts libraries read at import).
        """
        out: dict[str, float | None] = {f"folder_read_{round(share * 100)}pct_s": None for share in SHARES}
        cached = 0.0
        for sample in self.samples:
            cached = max(cached, sample["folder_resident_gb"])
            read = max(cached, (sample["io_read_gb"] or 0) if cached >= 0.5 * total / 1e9 else 0)
            for share in SHARES:
                key = f"folder_read_{round(share * 100)}pct_s"
                if out[key] is None and read * 1e9 >= share * total:
                    out[key] = sample["t"]
        return out


def component_residency(folder: Path, paths: Sequence[Path]) -> dict[str, int]:
    """Page-cache bytes per component (top-level folder; loose files as `other`)."""
    out: dict[str, int] = {}
    for path in paths:
        parts = path.relative_to(folder).parts
        key = parts[0] if len(parts) > 1 else "other"
        out[key] = out.get(key, 0) + pagecache.resident_bytes(path)
    return out


def environment(folder: Path, variant: str, settings: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: this checkout's src/ first on PYTHONPATH, so the code measured is the code here
    (an editable install of another checkout would win otherwise)."""
    path = os.pathsep.join(p for p in (str(benchlib.ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {"MODEL_PATH": str(folder), "MODEL_VARIANT": variant, "WARMUP": "1", "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": path,
            **QUIET_ENV, **settings}


def package(env: Mapping[str, str]) -> str:
    """Where a worker started with `env` imports qwen_edit_worker from (the same interpreter, folder and
    PYTHONPATH as handler.py); SystemExit when it is not this checkout's src/."""
    out = subprocess.run([sys.executable, "-c", "import qwen_edit_worker; print(qwen_edit_worker.__file__)"],
                         cwd=benchlib.ROOT, env=dict(env), capture_output=True, text=True, timeout=120)
    found = out.stdout.strip()
    if out.returncode != 0 or not Path(found).resolve().is_relative_to((benchlib.ROOT / "src").resolve()):
        raise SystemExit(f"the worker would not run this checkout's code: it imports {found or out.stderr[-500:]}")
    return found


def run(folder: Path, variant: str, port: int, settings: Mapping[str, str], paths: Sequence[Path],
        timeout_s: float = 3600) -> dict[str, Any]:
    """Start the worker on `folder`, wait for "model ready", stop it; the measurements."""
    env = environment(folder, variant, settings)
    lines: list[tuple[float, str]] = []
    progress: list[tuple[float, str]] = []
    ready_at: list[float] = []
    done, logged = threading.Event(), threading.Event()
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
            if TIMELINE in line or FAILED in line:
                logged.set()
        done.set()
        logged.set()

    reader = threading.Thread(target=follow, daemon=True)
    peak: dict[str, int] = {}
    read: int | None = None
    with Watcher(process.pid, folder, paths, started) as watcher:
        reader.start()
        try:
            done.wait(timeout_s)
            peak, read = status(process.pid), io_read_bytes(process.pid)
            logged.wait(TIMELINE_WAIT_S)  # the worker logs its timeline just after "model ready"
        finally:
            stop(process)
    reader.join(10)
    seen = dict(watcher.most_resident)  # the cache was dropped before the start: what is in it, the load read
    for name, size in component_residency(folder, paths).items():
        seen[name] = max(size, seen.get(name, 0))
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
            "io_read_gb_at_ready": None if read is None else round(read / 1e9, 3),
            "folder_cached_gb_most_seen": {k: round(v / 1e9, 3) for k, v in sorted(seen.items())},
            "folder_read_fraction_at_ready": None if read is None or not total else round(read / total, 3),
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
