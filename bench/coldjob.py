"""bench/coldstart --first-job: when the job waiting at the start is taken, and answered, under RunPod's job loop.

Why this exists: with little traffic the job that wakes a worker is the job that waits for its cold start.  This
starts `python handler.py` as RunPod does (RUNPOD_WEBHOOK_* pointing at the fake queue of tests/fake_queue.py
on loopback, the SDK's system checks skipped: nothing leaves this machine) with one job already queued, and
reads: when the SDK took it (the queue's clock, from just before the process started), when its answer came,
and from the worker itself, when the model was ready (its `load timeline`) and how long the job waited for it
(`timing.load_ms`) and encoded its prompt (`timing.text_encode_ms`, done while the transformer was read).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib

sys.path.insert(0, str(benchlib.ROOT / "tests"))
from fake_queue import deployed_worker, serve_queue  # noqa: E402

TIMELINE = re.compile(r"load timeline: (\{.*\})")


def measure(model_path: Path | None, variant: str, job_input: dict[str, Any], runs: int) -> list[dict[str, Any]]:
    """`runs` deployed starts, each with one job waiting; one row of figures each."""
    rows = []
    for run in range(runs):
        with tempfile.TemporaryDirectory(prefix="coldjob-") as scratch, serve_queue() as queue:
            log = Path(scratch) / "worker.log"
            env = {"LOG_LEVEL": "INFO", "WARMUP": "1", "MODEL_VARIANT": variant, "SAFETY_CHECKER": "request"}
            env |= {"TINY_MODEL": "0", "MODEL_PATH": str(model_path), **baked(model_path)} if model_path else {
                "TINY_MODEL": "1"}
            queue.put({"id": f"first-{run}", "input": job_input})
            started = time.monotonic()
            with deployed_worker(queue, log, **env):
                done = queue.wait_done([f"first-{run}"], 1800)[f"first-{run}"]
            text = log.read_text()
        taken = queue.of("take", f"first-{run}")[0].at - started
        found = TIMELINE.search(text)
        timeline = json.loads(found.group(1)) if found else {}
        output = done.body.get("output") or {}
        timing = output.get("timing", {})
        rows.append({"run": run + 1, "taken_s": round(taken, 2), "answered_s": round(done.at - started, 2),
                     "ready_s": timeline.get("ready_s"), "imports_s": timeline.get("imports_s"),
                     "text_ready_s": timeline.get("text_ready_s"), "cold_start": timing.get("cold_start"),
                     "load_ms": timing.get("load_ms"), "text_encode_ms": timing.get("text_encode_ms"),
                     "total_ms": timing.get("total_ms"), "error": done.body.get("error")})
    return rows


def baked(model_path: Path) -> dict[str, str]:
    """PRECISION and TEXT_ENCODER_PRECISION as the bake stored them (what the image's settings default to)."""
    try:
        stored = json.loads((model_path / "manifest.json").read_text())["prepared"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {"PRECISION": stored["transformer"], "TEXT_ENCODER_PRECISION": stored["text_encoder"]}
