"""The worker's error types and the one shape every caller-facing error takes.

Why this exists: a caller must be able to act on an error without reading our code, so every
error names what it is about (a request field like `input.seed`, or a setting like `MODEL_PATH`)
and what is allowed, in one shape: "<subject>: <what is wrong and what is allowed>".  Tracebacks
go to the log, never to the caller.
"""

from __future__ import annotations


class WorkerError(Exception):
    """An error whose message is safe and useful to show to the caller."""

    def __init__(self, subject: str, message: str) -> None:
        super().__init__(f"{subject}: {message}")
        self.subject = subject
        self.message = message


class RequestError(WorkerError):
    """The job's input is invalid; `subject` is the field, e.g. `input.megapixels`."""


class SettingsError(WorkerError):
    """An environment setting has a value the worker cannot use; `subject` is its name."""


class ModelLoadError(WorkerError):
    """The model could not be loaded; `subject` names the setting or file at fault."""


def describe(value: object, limit: int = 40) -> str:
    """A short, log-safe rendering of a rejected value (never a whole base64 payload)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
