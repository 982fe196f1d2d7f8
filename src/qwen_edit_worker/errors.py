"""The worker's error types and the one shape every caller-facing error takes.

Why this exists: a caller must be able to act on an error without reading our code, so every
error names what it is about (a request field like `input.seed`, or a setting like `MODEL_PATH`)
and what is allowed, in one shape: "<subject>: <what is wrong and what is allowed>".  Tracebacks
go to the log, never to the caller.  The base type and ModelLoadError are defined in
`weights.errors` (the bake imports that subpackage alone) and re-exported here.
"""

from __future__ import annotations

from .weights.errors import ModelLoadError, WorkerError

__all__ = ["ModelLoadError", "RequestError", "SettingsError", "WorkerError", "describe"]


class RequestError(WorkerError):
    """The job's input is invalid; `subject` is the field, e.g. `input.megapixels`."""


class SettingsError(WorkerError):
    """An environment setting has a value the worker cannot use; `subject` is its name."""


def describe(value: object, limit: int = 40) -> str:
    """A short, log-safe rendering of a rejected value (never a whole base64 payload)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
