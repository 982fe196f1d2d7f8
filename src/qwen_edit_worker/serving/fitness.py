"""What a deployed worker does when its model fails to load: RunPod's fitness check.

Why this exists: runpod 1.12 runs fitness checks before a worker takes its first job; a check
that raises makes the SDK report the worker unhealthy (with the reason) and exit, and RunPod
starts another.  That is right for some load failures and wrong for others, so the check
(`model_loaded`) tells them apart:

- A failure the loader foresaw (a bad setting, a missing model folder or LoRA file, a backend or
  precision this GPU cannot run) names the setting or file at fault.  A new worker from the same
  image and settings would fail the same way, so exiting would only restart workers in a loop,
  each paying a cold start, while callers' jobs wait with no reason given.  The check passes and
  the worker answers every job at once with the clear error, so callers see what to fix and pay
  milliseconds per job.
- An unforeseen failure (a CUDA or driver error, running out of memory while loading, a broken
  install) most likely belongs to this machine.  The check fails, so RunPod replaces the worker
  and the jobs stay queued for a healthy one instead of failing here.

With WARMUP=1 the check waits for the background load, so a worker takes no job before its
model is ready: jobs are not held by a loading worker while a warm one could run them, which is
also how most workers behave (they load before starting the SDK).  With WARMUP=0 the model loads
with the first job and the check has nothing to wait for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger(__name__)


def model_check(worker: Worker) -> Callable[[], None]:
    """The fitness check for `worker`, to pass to `runpod.serverless.register_fitness_check`."""

    def model_loaded() -> None:
        if worker.settings_error is not None:
            log.error("fitness: serving the settings error to every job: %s", worker.settings_error)
            return
        assert worker.settings is not None
        if not worker.settings.warmup:
            log.info("fitness: WARMUP=0, the model loads with the first job")
            return
        error = worker.model.wait()
        if error is None:
            log.info("fitness: model loaded")
        elif worker.model.unforeseen is None:
            log.error("fitness: serving the load error to every job (a new worker would fail the same way): %s",
                      error)
        else:
            cause = worker.model.unforeseen
            raise RuntimeError(f"the model failed to load ({type(cause).__name__}: {cause}); this machine is "
                               "likely at fault, so RunPod should replace the worker")

    return model_loaded
