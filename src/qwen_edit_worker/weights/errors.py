"""The one shape every caller-facing error takes, and the error a model load raises.

Why this exists here: the bake (builder/bake.py) imports this subpackage on its own, so the base
error type lives in it rather than above it; `qwen_edit_worker.errors` re-exports both names and
adds the request and settings errors.  Every error names what it is about (a request field like
`input.seed`, or a setting like `MODEL_PATH`) and what is allowed: "<subject>: <what is wrong>".
Tracebacks go to the log, never to the caller.
"""

from __future__ import annotations


class WorkerError(Exception):
    """An error whose message is safe and useful to show to the caller."""

    def __init__(self, subject: str, message: str) -> None:
        super().__init__(f"{subject}: {message}")
        self.subject = subject
        self.message = message


class ModelLoadError(WorkerError):
    """The model could not be loaded; `subject` names the setting or file at fault."""
