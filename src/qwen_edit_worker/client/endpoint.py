"""Talking to a RunPod endpoint: submit a job, poll it, retry what is worth retrying.

Why this exists: the command-line client must survive a busy endpoint (429, 5xx and dropped
connections are retried with exponential backoff, honouring Retry-After) and must say plainly
what a person can fix (401: the API key; 404: the endpoint id or base URL; FAILED: the worker's
own error text).  The API key goes only into the Authorization header: never printed or stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests

RUNPOD_API = "https://api.runpod.ai/v2"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


class EndpointError(Exception):
    """A request or job failed in a way retrying will not fix; the message says what to do."""


@dataclass
class EndpointClient:
    base_url: str  # e.g. https://api.runpod.ai/v2/<endpoint id>, or http://127.0.0.1:8000 for a local worker
    api_key: str | None
    retries: int = 5
    backoff_s: float = 0.5
    poll_interval_s: float = 0.5
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._session = requests.Session()
        if self.api_key:
            self._session.headers["Authorization"] = f"Bearer {self.api_key}"

    def run_sync(self, job: dict[str, Any]) -> dict[str, Any]:
        """POST /runsync; if RunPod answers before the job ends, keep polling /status."""
        body = self._request("POST", "/runsync", job)
        return body if body.get("status") in FINAL else self.wait(body["id"])

    def submit(self, job: dict[str, Any]) -> str:
        """POST /run; return the job id."""
        body = self._request("POST", "/run", job)
        if "id" not in body:
            raise EndpointError(f"{self.base_url}/run answered without a job id: {str(body)[:200]}")
        return str(body["id"])

    def status(self, job_id: str) -> dict[str, Any]:
        """GET /status/{id} (RunPod), falling back to POST (the SDK's local server accepts only POST)."""
        try:
            return self._request("GET", f"/status/{job_id}")
        except _MethodNotAllowed:
            return self._request("POST", f"/status/{job_id}")

    def wait(self, job_id: str) -> dict[str, Any]:
        """Poll until the job ends (COMPLETED, FAILED, CANCELLED, TIMED_OUT) or timeout_s passes."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            body = self.status(job_id)
            if body.get("status") in FINAL:
                return body
            if time.monotonic() > deadline:
                raise EndpointError(f"job {job_id} did not finish within {self.timeout_s:.0f} s "
                                    f"(last status {body.get('status')})")
            time.sleep(self.poll_interval_s)

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                response = self._session.request(method, url, json=payload, timeout=(10, 120))
            except requests.RequestException as err:
                problem = f"cannot reach {self.base_url} ({type(err).__name__})"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise EndpointError(f"{url} answered 200 with a body that is not JSON") from None
                if response.status_code == 401:
                    raise EndpointError("401 Unauthorized: the endpoint refused the API key; check RUNPOD_API_KEY")
                if response.status_code == 404:
                    raise EndpointError(f"404 Not Found at {url}: check the endpoint id (--endpoint or "
                                        "RUNPOD_ENDPOINT_ID) or --base-url")
                if response.status_code == 405:
                    raise _MethodNotAllowed(url)
                if response.status_code != 429 and response.status_code < 500:
                    raise EndpointError(f"{url} answered HTTP {response.status_code}: {response.text[:200]}")
                problem = f"{url} answered HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), 60.0))
            if attempt == self.retries:
                raise EndpointError(f"{problem}; gave up after {self.retries + 1} attempts")
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")


class _MethodNotAllowed(EndpointError):
    pass


def endpoint_base(endpoint_id: str | None, base_url: str | None) -> str:
    """--base-url replaces the whole base; else RunPod's API base plus the endpoint id."""
    if base_url:
        return base_url
    if not endpoint_id:
        raise EndpointError("no endpoint: give --endpoint ID, set RUNPOD_ENDPOINT_ID, or give --base-url")
    return f"{RUNPOD_API}/{endpoint_id}"
