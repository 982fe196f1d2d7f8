"""Logging set-up, done once per process by the entry point.

Why this exists: one format for every line the worker writes (RunPod shows them in the
endpoint's logs), and the chatty libraries kept at WARNING whatever LOG_LEVEL says, so a person
can read a job's story at INFO, and DEBUG never turns on library logs that print request
signatures (botocore signs presigned URLs at DEBUG), URLs or payloads.

The RunPod SDK has its own logger (print-based, not `logging`) that defaults to DEBUG: a line
for every heartbeat and job poll, and at DEBUG it prints each handler's whole output (base64
pictures included).  `follow_log_level` sets it from LOG_LEVEL, capped at INFO for the same
reason as the libraries above; an explicit RUNPOD_LOG_LEVEL still wins, for people debugging
the SDK itself.
"""

from __future__ import annotations

import logging
import os
import sys

QUIET = ("diffusers", "transformers", "urllib3", "httpx", "httpcore", "botocore", "boto3", "s3transfer", "peft",
         "huggingface_hub", "filelock", "PIL")


def quiet_libraries() -> None:
    """Keep third-party loggers at WARNING or above."""
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    quiet_libraries()


# LOG_LEVEL -> the RunPod SDK's level names (it has WARN, not WARNING); never its DEBUG.
RUNPOD_LEVELS = {"DEBUG": "INFO", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR"}


def runpod_log_level(level: str, env: dict[str, str] | None = None) -> str:
    """The RunPod SDK's log level for LOG_LEVEL `level`: RUNPOD_LOG_LEVEL if set, else the mapped level."""
    env = dict(os.environ) if env is None else env
    explicit = env.get("RUNPOD_LOG_LEVEL", "").strip()
    return explicit.upper() if explicit else RUNPOD_LEVELS.get(level.upper(), "INFO")


def follow_log_level(level: str) -> str:
    """Make the RunPod SDK's logger follow LOG_LEVEL; call before the SDK starts.  Returns its level.

    The SDK reads RUNPOD_LOG_LEVEL when it is first imported (and so does any process it starts);
    if it is imported already, its logger is set directly.
    """
    sdk_level = runpod_log_level(level)
    os.environ["RUNPOD_LOG_LEVEL"] = sdk_level
    if "runpod.serverless.modules.rp_logger" in sys.modules:
        from runpod.serverless.modules.rp_logger import RunPodLogger

        RunPodLogger().set_level(sdk_level)
    return sdk_level
