"""Logging set-up, done once per process by the entry point.

Why this exists: one format for every line the worker writes (RunPod shows them in the
endpoint's logs), and the chatty libraries (diffusers' experimental-API notices, HTTP clients)
kept at WARNING so a person can read a job's story at INFO.
"""

from __future__ import annotations

import logging

QUIET = ("diffusers", "transformers", "urllib3", "httpx", "botocore", "boto3", "s3transfer", "peft")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
