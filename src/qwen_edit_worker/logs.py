"""Logging set-up, done once per process by the entry point.

Why this exists: one format for every line the worker writes (RunPod shows them in the
endpoint's logs), and the chatty libraries kept at WARNING whatever LOG_LEVEL says, so a person
can read a job's story at INFO, and DEBUG never turns on library logs that print request
signatures (botocore signs presigned URLs at DEBUG), URLs or payloads.
"""

from __future__ import annotations

import logging

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
