"""RunPod serverless entry point for Qwen-Image-Edit: parse, validate, run, report.

    python handler.py                      deployed: RunPod's job loop; locally: runs test_input.json
    python handler.py --test_input '<json>' runs one job locally, writes the pictures to outputs/
    python handler.py --rp_serve_api       the SDK's local HTTP API (/runsync, /run, /status)
    ENDPOINT_TYPE=lb python handler.py     a load-balancing endpoint: HTTP on PORT (OpenAI Images API,
                                           /runsync, /ping); qwen_edit_worker.serving.http

Importing this module loads no model: loading starts when the worker starts (WARMUP=1, in the
background) or with the first job (WARMUP=0).  The work lives in the qwen_edit_worker package.

The handler is async and runs each job in a worker thread, so RunPod's job loop stays free to
take the next job (up to CONCURRENCY at once) while one is on the GPU; the GPU itself runs one
job at a time (qwen_edit_worker.serving.gpu_section).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from qwen_edit_worker.serving.logs import configure_logging, follow_log_level
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.settings import front_door

_worker: Worker | None = None


def deployed() -> bool:
    """True inside a RunPod endpoint (the platform tells the SDK where to fetch jobs)."""
    return bool(os.environ.get("RUNPOD_WEBHOOK_GET_JOB"))


def get_worker() -> Worker:
    """The process's one Worker, created (and its warm-up started) on first use."""
    global _worker
    if _worker is None:
        progress = None
        if deployed():
            import runpod

            progress = runpod.serverless.progress_update
        _worker = Worker(progress=progress)
        _worker.start()
    return _worker


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler: one job's input in, its output (or error) out, worked in a thread."""
    return await asyncio.to_thread(get_worker().handle, job)


def main(argv: list[str]) -> int:
    level = os.environ.get("LOG_LEVEL", "INFO")
    configure_logging(level)
    follow_log_level(level)  # before the SDK's first import: its own logger defaults to DEBUG
    worker = get_worker()
    if front_door(os.environ, deployed()) == "lb":
        from qwen_edit_worker.serving.http.server import serve

        return serve(worker)
    if deployed() or "--rp_serve_api" in argv:
        import runpod

        # The job loop starts at once, the model still loading: a waiting job is taken now, its pictures fetched
        # and its prompt encoded while the weights come in (serving/worker.py), and a failed load answers it.
        runpod.serverless.start({"handler": handler, "concurrency_modifier": worker.concurrency})
        return 0
    from qwen_edit_worker.serving.local import run_local

    return run_local(handler, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
