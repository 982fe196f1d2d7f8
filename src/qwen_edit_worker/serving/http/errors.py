"""The one error shape every HTTP answer of the load-balancing front door takes: OpenAI's.

Why this exists: clients of the load-balancing endpoint speak the OpenAI API, and the OpenAI SDKs
read `{"error": {"message", "type", "param", "code"}}` and pick their exception class by status
(400 BadRequestError, 401 AuthenticationError, 413, 429 RateLimitError, 5xx InternalServerError).
Every refusal, from a bad field to a full worker, is built here, so the shape cannot drift; the
message never holds a traceback.
"""

from __future__ import annotations

from aiohttp import web

# OpenAI's `type` per status class (its API answers 429 with type "requests", 5xx with "server_error").
_TYPES = {429: "requests"}


class ApiError(Exception):
    """A refusal with its HTTP status, raised by a route and answered by the server's middleware."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI's error body with `status`."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)
