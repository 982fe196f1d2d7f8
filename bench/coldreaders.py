"""bench/coldstart --real-shape --readers 1,2,4,8: what each read-ahead reader count costs and gains on this host.

Why this exists: the read-ahead's reader count is chosen from the host (src/qwen_edit_worker/model/readers.py:
4 a CPU the process may use, at most 16, or READAHEAD_READERS).  More readers put more reads in flight (the
disk's rate) and take CPU from the imports running beside them; which wins depends on the host, so it is
measured, not assumed.  For each count, in rounds interleaved (1,2,4,8,1,2,4,8: noise from other work on a
shared machine hits each count alike), each from the folder's page cache dropped and checked:
- the bench's own raw read of the folder at that count (bench/rawread.py: the disk's rate with that many
  reads in flight, nothing else running);
- a new worker process with READAHEAD_READERS set to it (its own "read-ahead:" log line is checked to name
  that count): ready, the imports (its load timeline), and the read-ahead's own read (its closing log line).
Then each as a ratio to the first count (normally 1): the raw read's and read-ahead's speed-ups are the gain,
the imports' and ready's ratios the cost (or the gain).  Each round ends with one start from a warm page
cache at the host's own count: the imports and construction with no disk to wait for.  The 1-minute load
average is recorded before every timed step (it counts tasks waiting on the disk too, so it also carries the
last step's readers); wall times on a shared machine are noisy, bytes and counts are not.
"""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Any

import benchlib
import coldreal
import coldworker
import pagecache
import rawread
import realfolder
import realscale
from qwen_edit_worker.model import readers

START = re.compile(r"read-ahead: \d+ files, [\d.]+ GB, (\d+) readers \((.*)\), window")
END = re.compile(r"read-ahead: ([\d.]+) GB read in ([\d.]+) s")
LOGGED = re.compile(r"^\s*([\d.]+)s (.*)$")
ROUNDS = 2
MEDIANS = ("ready_s", "imports_s", "readahead_s", "raw_read_s")


def parse_counts(text: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8]; ValueError naming what is allowed."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or len(set(counts)) != len(counts) or not all(1 <= n <= 64 for n in counts):
        raise ValueError(f"--readers: distinct whole numbers from 1 to 64, comma-separated, such as 1,2,4,8 (got "
                         f"{text!r})")
    return counts


def read_ahead(log: list[str]) -> dict[str, Any]:
    """From the worker's kept log lines: the read-ahead's readers and where the count came from (its starting
    line), and its read: bytes, seconds, and when its closing line arrived (seconds since the process started)."""
    out: dict[str, Any] = {"readahead_readers": None, "readahead_source": None, "readahead_gb": None,
                           "readahead_s": None, "readahead_done_at_s": None}
    for entry in log:
        logged = LOGGED.match(entry)
        at, text = (float(logged.group(1)), logged.group(2)) if logged else (None, entry)
        if (start := START.search(text)) and out["readahead_readers"] is None:
            out["readahead_readers"], out["readahead_source"] = int(start.group(1)), start.group(2)
        elif (end := END.search(text)) and out["readahead_s"] is None:
            out["readahead_gb"], out["readahead_s"], out["readahead_done_at_s"] = (
                float(end.group(1)), float(end.group(2)), at)
    return out


def measure(folder: Path, blocks: int, layout: str, variant: str, port: int, safety: str,
            written: dict[str, Any], counts: list[int], rounds: int = ROUNDS) -> dict[str, Any]:
    """The sweep: `rounds` x (each count: raw read, worker), then a warm start; the result object (--json)."""
    paths = pagecache.files(folder)
    total = sum(p.stat().st_size for p in paths)
    settings = coldreal.worker_settings(layout, safety)
    package = coldworker.package(coldworker.environment(folder, variant, settings))
    runs: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    for round_ in range(1, rounds + 1):
        for count in counts:
            runs.append({"round": round_, "readers": count,
                         **one(folder, variant, port, {**settings, "READAHEAD_READERS": str(count)}, paths, total)})
        load = os.getloadavg()[0]
        start = coldreal.start_worker(folder, variant, port, settings, paths, total, cached=True)
        warm.append({"round": round_, "loadavg_1min_before": round(load, 2), "ready_s": start["ready_s"],
                     "imports_s": start["imports_s"], "resident_before": start["resident_before"],
                     **read_ahead(start["log"])})
    by_count = summary(runs, counts, total)
    full = realscale.full_bytes(folder, written["component_bytes"], {
        "transformer": blocks, "lightning": blocks, "text_encoder": realfolder.TEXT_LAYERS})
    full_total = sum(full.values())
    chosen = readers.choose(None)
    return {
        "blocks": blocks, "layout": layout, "variant": variant, "bytes": total, "gb": round(total / 1e9, 3),
        "component_gb": {k: round(v / 1e9, 3) for k, v in written["component_bytes"].items()},
        "counts": counts, "rounds": rounds, "order": [r["readers"] for r in runs],
        "by_readers": by_count,
        "warm_start": {"ready_s": _median(warm, "ready_s"), "imports_s": _median(warm, "imports_s"), "runs": warm},
        "chosen_here": {"readers": chosen.count, "source": chosen.source},
        "at_60_blocks_derived": {
            "derived": True, "gb": round(full_total / 1e9, 2),
            "how": "the folder's bytes plus the missing blocks and layers at block 0's bytes (bench/realscale.py), "
                   "read at each count's median raw rate on this disk; a GPU host's NVMe is not measured here",
            "raw_read_s_by_readers": {str(c): round(full_total / (by_count[str(c)]["raw_read_gb_s"] * 1e9), 1)
                                      for c in counts if by_count[str(c)]["raw_read_gb_s"]}},
        "worker_settings": settings, "worker_package": package, "runs": runs,
        "machine": {**benchlib.machine(), "ram_gb": coldreal.ram_gb(), "cpus": readers.host_cpus().describe()},
        "commit": coldreal.commit(),
        "noise": "wall times on a shared machine: loadavg_1min_before is recorded before every timed step",
    }


def one(folder: Path, variant: str, port: int, settings: dict[str, str], paths: list[Path], total: int
        ) -> dict[str, Any]:
    """One count's raw read and worker start, each from a dropped (checked) page cache."""
    count = int(settings["READAHEAD_READERS"])
    load_raw = os.getloadavg()[0]
    before = pagecache.drop_checked(paths)
    seconds, size = rawread.buffered(paths, count)
    coldreal.log(f"raw read, {count} reader(s): {seconds:.1f} s, {size / seconds / 1e9:.2f} GB/s")
    load_worker = os.getloadavg()[0]
    worker = coldreal.start_worker(folder, variant, port, settings, paths, total)
    ahead = read_ahead(worker["log"])
    if ahead["readahead_readers"] != count:
        raise SystemExit(f"the worker's read-ahead ran {ahead['readahead_readers']} readers, not the {count} "
                         f"READAHEAD_READERS asked for (its log: {ahead['readahead_source']})")
    timeline = worker["timeline"] or {}
    return {"loadavg_1min_before_raw": round(load_raw, 2), "raw_read_s": round(seconds, 2),
            "raw_read_gb_s": round(size / seconds / 1e9, 3), "raw_resident_before": before["resident_fraction"],
            "loadavg_1min_before_worker": round(load_worker, 2), "resident_before_worker": worker["resident_before"],
            "ready_s": worker["ready_s"], "imports_s": worker["imports_s"],
            "text_ready_s": timeline.get("text_ready_s"), "worker_ready_s": timeline.get("ready_s"),
            "folder_read_99pct_s": worker.get("folder_read_99pct_s"), "peak_rss_gb": worker["peak_rss_gb"], **ahead}


def summary(runs: list[dict[str, Any]], counts: list[int], total: int) -> dict[str, dict[str, Any]]:
    """Per count: the medians over rounds with their ranges, and each as a ratio to the first count's."""
    out: dict[str, dict[str, Any]] = {}
    for count in counts:
        mine = [r for r in runs if r["readers"] == count]
        row: dict[str, Any] = {"runs": len(mine)}
        for key in MEDIANS:
            row[key] = _median(mine, key)
            values = [r[key] for r in mine if r[key] is not None]
            row[f"{key}_range"] = [min(values), max(values)] if values else None
        row["raw_read_gb_s"] = round(total / row["raw_read_s"] / 1e9, 3) if row["raw_read_s"] else None
        row["readahead_gb_s"] = round(total / row["readahead_s"] / 1e9, 3) if row["readahead_s"] else None
        out[str(count)] = row
    base = out[str(counts[0])]
    for row in out.values():  # gains: base / this (higher is faster); costs: this / base (higher is slower)
        row[f"raw_read_speedup_vs_{counts[0]}"] = _ratio(base["raw_read_s"], row["raw_read_s"])
        row[f"readahead_speedup_vs_{counts[0]}"] = _ratio(base["readahead_s"], row["readahead_s"])
        row[f"imports_vs_{counts[0]}"] = _ratio(row["imports_s"], base["imports_s"])
        row[f"ready_vs_{counts[0]}"] = _ratio(row["ready_s"], base["ready_s"])
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 2) if top is not None and bottom else None


def report(result: dict[str, Any]) -> None:
    """The readable table (without --json)."""
    base = result["counts"][0]
    print(f"# bench/coldstart --real-shape --blocks {result['blocks']} --layout {result['layout']} --readers "
          f"{','.join(map(str, result['counts']))}: {result['gb']:.2f} GB, {result['rounds']} rounds interleaved "
          f"({result['order']}), page cache dropped and checked before each; medians, shared machine (noisy)")
    print(f"# {result['machine']}")
    rows = []
    for count in result["counts"]:
        row = result["by_readers"][str(count)]
        rows.append({"readers": count, "ready_s": row["ready_s"], "imports_s": row["imports_s"],
                     "read_ahead_s": row["readahead_s"], "read_ahead_gb_s": row["readahead_gb_s"],
                     "raw_read_s": row["raw_read_s"], "raw_gb_s": row["raw_read_gb_s"],
                     f"raw_x{base}": row[f"raw_read_speedup_vs_{base}"],
                     f"ahead_x{base}": row[f"readahead_speedup_vs_{base}"],
                     f"imports_/{base}": row[f"imports_vs_{base}"], f"ready_/{base}": row[f"ready_vs_{base}"]})
    print(benchlib.table(rows, list(rows[0])))
    warm = result["warm_start"]
    print(f"# warm page cache (no disk), the host's own count: ready {warm['ready_s']} s, imports "
          f"{warm['imports_s']} s")
    print(f"# the rule here: {result['chosen_here']['readers']} readers ({result['chosen_here']['source']})")
    derived = result["at_60_blocks_derived"]
    print(f"# DERIVED at 60 blocks ({derived['gb']} GB), raw read s by readers: {derived['raw_read_s_by_readers']}")
