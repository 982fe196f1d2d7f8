"""bench/coldstart --real-shape: a real-shaped folder, the disk's limit, and the worker's cold start, in one run.

Why this exists: "ready within 1.2x of the raw read" needs both figures from the same disk in the same
run, each on a cold page cache.  This writes (or reuses) the folder (bench/realfolder.py, in its own
process so the writer's memory is gone before the worker starts), then, the folder's cached pages
dropped and checked before each: reads every file with 1, 2 and 4 readers and once with O_DIRECT
(bench/rawread.py), and starts a new worker process on it (bench/coldworker.py).  The worker loads on
this machine's device (the CPU here, a GPU there) through its own load path; nothing else differs.
A last start from a warm page cache (the folder read just before) gives what the start costs without
the disk (imports and construction): `disk_cost_s` is what the disk added to it, and
`ready_over_larger_limit` the cold start over the larger of the two limits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import benchlib
import coldworker
import pagecache
import rawread
import realfolder
import realscale

READERS = (1, 2, 4)
ROUNDS = 2
NOT_REPEATED = ("samples", "log", "timeline", "imports_s", "ready_s", "resident_before", "mem_available_gb_before")
RUN_FIELDS = ("ready_s", "imports_s", "peak_rss_gb", "folder_read_fraction_at_ready", "folder_read_1pct_s",
              "resident_before", "mem_available_gb_before")
NO_TIMELINE = ("the worker logged no 'load timeline:' line (a worker from before issue 27 does not): imports_s is "
               "null; ready_s and the sampled folder reads stand")

UNREAD = ("ready came before {:.0%} of the folder's bytes had been read from storage (read_bytes): tensors left "
          "backed by the file mapping (safetensors mmap; int8 weights on a CPU) are read when first used, so the first "
          "job pays that read")


def ensure_folder(folder: Path, blocks: int, layout: str, variant: str) -> dict[str, Any]:
    """The folder's description: reused when it is whole and of this shape, else written by a child process."""
    if realfolder.complete(folder, blocks, layout, variant):
        log(f"reusing {folder}: a complete {layout} folder with {blocks} blocks")
        return {**realfolder.describe(folder), "reused": True}
    log(f"writing a {layout} folder with {blocks} of 60 blocks into {folder}")
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("realfolder.py")), "--blocks", str(blocks),
                          "--layout", layout, "--variant", variant, "--dir", str(folder)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"writing the folder failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "reused": False}


def disk_limit(paths: list[Path], rounds: int = ROUNDS) -> dict[str, Any]:
    """Every file read with READERS buffered readers (`rounds` times over) and once with O_DIRECT, each from a
    dropped cache; the best is the disk's limit (a shared VM's disk varies: the first read after a write can
    meet its discards and writeback)."""
    rows = []
    for round_ in range(1, rounds + 1):
        for readers in READERS:
            before = pagecache.drop_checked(paths)
            seconds, size = rawread.buffered(paths, readers)
            rows.append({"round": round_, "readers": readers, "seconds": round(seconds, 2),
                         "gb_s": round(size / seconds / 1e9, 3), "resident_before": before["resident_fraction"]})
            log(f"raw read, round {round_}, {readers} reader(s): {seconds:.1f} s, {size / seconds / 1e9:.2f} GB/s")
    best = min(rows, key=lambda r: r["seconds"])
    before = pagecache.drop_checked(paths)
    timed = rawread.direct(paths)
    direct = None if timed is None else {"seconds": round(timed[0], 2), "gb_s": round(timed[1] / timed[0] / 1e9, 3),
                                         "resident_before": before["resident_fraction"]}
    by_readers = {str(n): min(r["seconds"] for r in rows if r["readers"] == n) for n in READERS}
    return {"raw_read_s": best["seconds"], "raw_read_gb_s": best["gb_s"], "raw_read_readers": best["readers"],
            "raw_read_best_s_by_readers": by_readers, "raw_read": rows, "direct_read": direct}


def measure(folder: Path, blocks: int, layout: str, variant: str, port: int, safety: str,
            written: dict[str, Any], runs: int = 1) -> dict[str, Any]:
    """Disk limit, then the worker `runs` times (each from a dropped cache): the result object (--json prints it).

    With several runs the figures are the median run's (by ready_s), every run listed in `worker_runs`.
    """
    paths = pagecache.files(folder)
    total = sum(p.stat().st_size for p in paths)
    disk = disk_limit(paths)
    settings = worker_settings(layout, safety)
    package = coldworker.package(coldworker.environment(folder, variant, settings))
    workers = [start_worker(folder, variant, port, settings, paths, total) for _ in range(runs)]
    worker = sorted(workers, key=lambda w: w["ready_s"])[(runs - 1) // 2]
    timeline = worker["timeline"]
    warm = start_worker(folder, variant, port, settings, paths, total, cached=True)
    floor = max(disk["raw_read_s"], warm["ready_s"])  # the larger of the disk's limit and the start without a disk
    result: dict[str, Any] = {
        "blocks": blocks, "layout": layout, "variant": variant, "text_layers": realfolder.TEXT_LAYERS,
        "bytes": total, "gb": round(total / 1e9, 3),
        "component_gb": {k: round(v / 1e9, 3) for k, v in written["component_bytes"].items()},
        **{k: written.get(k) for k in ("reused", "write_s", "write_peak_rss_gb", "prepare_s", "prepare_peak_rss_gb")},
        **disk,
        "imports_s": None if timeline is None else timeline.get("imports_s"),
        "ready_s": worker["ready_s"],
        "ready_over_raw_read": round(worker["ready_s"] / disk["raw_read_s"], 2),
        "ready_warm_s": warm["ready_s"], "warm_imports_s": warm["imports_s"],
        "resident_before_warm_worker": warm["resident_before"],
        "disk_cost_s": round(worker["ready_s"] - warm["ready_s"], 2),
        "ready_over_larger_limit": round(worker["ready_s"] / floor, 2),
        "resident_before_worker": worker["resident_before"],
        "mem_available_gb_before_worker": worker["mem_available_gb_before"],
        "worker_settings": settings, "worker_package": package, "worker_device": "cuda" if gpu() else "cpu",
        "safety_checker": f"{safety}: real-shaped ViT-base (Falconsai's config), float32 as its file, loaded"
                          if safety != "off" else "off: not loaded",
        **{f"worker_{k}": v for k, v in (timeline or {}).items()},
        **{f"worker_{k}": v for k, v in worker.items() if k not in NOT_REPEATED},
        "timeline_note": None if timeline is not None else NO_TIMELINE,
        "read_note": None if (worker["folder_read_fraction_at_ready"] or 0) >= 0.99 else UNREAD.format(
            1 - (worker["folder_read_fraction_at_ready"] or 0)),
        "worker_runs": [{k: w.get(k) for k in RUN_FIELDS} for w in workers],
        "machine": {**benchlib.machine(), "ram_gb": ram_gb()}, "commit": commit(),
        "worker_log": worker["log"], "worker_samples": worker["samples"],
    }
    result["component_bytes"] = written["component_bytes"]
    result["at_60_blocks_derived"] = realscale.derive(folder, result)
    del result["component_bytes"]
    return result


def worker_settings(layout: str, safety: str) -> dict[str, str]:
    """The worker's settings for a folder of `layout`: as the image that bakes it sets them (Dockerfile: the
    run-time precisions default to the bake)."""
    settings = {"SAFETY_CHECKER": safety}
    if layout == "int8":
        settings |= {"PRECISION": "int8", "TEXT_ENCODER_PRECISION": "int8"}
    return settings


def start_worker(folder: Path, variant: str, port: int, settings: dict[str, str], paths: list[Path],
                 total: int, cached: bool = False) -> dict[str, Any]:
    """One worker process from a dropped (and checked) page cache; its measurements.  `cached`: from a page
    cache holding the whole folder instead (read just before, checked): the start without the disk, its imports
    and construction alone, which no read-ahead can hide."""
    if cached:
        rawread.buffered(paths, max(READERS))
        before = pagecache.residency(paths)
    else:
        before = pagecache.drop_checked(paths)
    available = mem_available_gb()
    log(f"starting the worker on {folder} ({total / 1e9:.2f} GB, {before['resident_fraction']:.1%} cached, "
        f"{available} GB available)")
    worker = coldworker.run(folder, variant, port, settings, paths)
    log(f"worker ready at {worker['ready_s']:.1f} s (peak RSS {worker['peak_rss_gb']} GB)")
    timeline = worker["timeline"] or {}
    return {**worker, "imports_s": timeline.get("imports_s"), "resident_before": before["resident_fraction"],
            "mem_available_gb_before": available}


def gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def commit() -> str | None:
    """The checkout's commit (the worker code that was measured), with "+dirty" when it has local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=benchlib.ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=benchlib.ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


def mem_available_gb() -> float | None:
    """MemAvailable now (a shared machine: what the worker and the page cache have between them)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 1)
    return None


def ram_gb() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table or the one JSON line)."""
    print(f"coldstart: {message}", file=sys.stderr, flush=True)


def report(result: dict[str, Any]) -> None:
    """The readable table (without --json)."""
    derived = result["at_60_blocks_derived"]
    print(f"# bench/coldstart --real-shape --blocks {result['blocks']} --layout {result['layout']}: "
          f"{result['gb']:.2f} GB, page cache dropped and checked before each timed read")
    print(f"# {result['machine']}")
    rows = [{"what": f"raw read, {r['readers']} reader(s), round {r['round']}", "seconds": r["seconds"],
             "gb_s": r["gb_s"], "cached_before": r["resident_before"]} for r in result["raw_read"]]
    if result["direct_read"]:
        d = result["direct_read"]
        rows.append({"what": "raw read, O_DIRECT, 1 reader", "seconds": d["seconds"], "gb_s": d["gb_s"],
                     "cached_before": d["resident_before"]})
    rows.append({"what": "worker: imports (its timeline)", "seconds": result["imports_s"] or "n/a"})
    rows.append({"what": "worker: ready", "seconds": result["ready_s"],
                 "gb_s": round(result["gb"] / result["ready_s"], 3), "cached_before": result["resident_before_worker"]})
    rows.append({"what": "worker: ready from a warm page cache (no disk)", "seconds": result["ready_warm_s"],
                 "cached_before": result["resident_before_warm_worker"]})
    rows.append({"what": f"DERIVED at 60 blocks ({derived['gb']} GB): raw read", "seconds": derived["raw_read_s"]})
    rows.append({"what": "DERIVED at 60 blocks: ready", "seconds": derived["ready_s"]})
    print(benchlib.table(rows, ["what", "seconds", "gb_s", "cached_before"]))
    for key in ("ready_over_raw_read", "disk_cost_s", "ready_over_larger_limit", "worker_peak_rss_gb", "component_gb",
                "worker_folder_cached_gb_most_seen",
                "worker_io_read_gb_at_ready",
                "safety_checker", "timeline_note", "read_note"):
        print(f"# {key}: {result[key]}")
    milestones = {k.removeprefix("worker_"): v for k, v in result.items() if k.startswith("worker_folder_read")}
    print(f"# folder in the page cache (sampled): {milestones}")
    print(f"# derived: {derived['how']}")
