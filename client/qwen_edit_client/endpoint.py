"""Talking to a RunPod endpoint: submit a job, poll it, and let urllib3 retry what is worth retrying.

Why this exists: the command-line client must survive a busy endpoint and must say plainly what a
person can fix.  Retries are urllib3's `Retry` mounted on a requests session (429, 500, 502, 503
and 504, and connections that fail, retried with exponential backoff; `Retry-After` honoured),
not a hand-written loop.  What is left here is the meaning of each answer: 401 (the API key),
404 (the endpoint id or base URL), FAILED (the worker's own error text).  The API key goes only
into the Authorization header: never printed or stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

RUNPOD_API = "https://api.runpod.ai/v2"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
RETRY_STATUSES = (429, 500, 502, 503, 504)


class EndpointError(Exception):
    """A request or job failed in a way retrying will not fix; the message says what to do."""


def retrying_session(retries: int, backoff_s: float, api_key: str | None) -> requests.Session:
    """A session whose every request is retried by urllib3 (POST included: RunPod answers 429/5xx
    before it queues a job)."""
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff_s,
                  backoff_max=30.0, status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "POST"}),
                  respect_retry_after_header=True, raise_on_status=False)
    return session_with(retry, api_key)


def session_with(retry: Retry, api_key: str | None) -> requests.Session:
    """A session that retries as `retry` says, over http and https, with the key as a Bearer token when given."""
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    return session


@dataclass
class EndpointClient:
    base_url: str  # e.g. https://api.runpod.ai/v2/<endpoint id>, or http://127.0.0.1:8000 for a local worker
    api_key: str | None
    retries: int = 5
    backoff_s: float = 0.5
    poll_interval_s: float = 0.5
    timeout_s: float = 900.0
    run_url: str | None = None  # an endpoint's own request URLs (REST API v2 `requestUrls`), else base_url's
    status_url: str | None = None  # with `{job_id}` where the job's id goes

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._session = retrying_session(self.retries, self.backoff_s, self.api_key)

    def run_sync(self, job: dict[str, Any]) -> dict[str, Any]:
        """POST /runsync; if RunPod answers before the job ends, keep polling /status."""
        body = self._request("POST", "/runsync", job)
        return body if body.get("status") in FINAL else self.wait(body["id"])

    def submit(self, job: dict[str, Any]) -> str:
        """POST /run; return the job id."""
        body = self._request("POST", self.run_url or "/run", job)
        if "id" not in body:
            url = self.run_url or f"{self.base_url}/run"
            raise EndpointError(f"{url} answered without a job id: {str(body)[:200]}")
        return str(body["id"])

    def status(self, job_id: str) -> dict[str, Any]:
        """GET /status/{id} (RunPod), falling back to POST (the SDK's local server accepts only POST)."""
        path = self.status_url.replace("{job_id}", job_id) if self.status_url else f"/status/{job_id}"
        try:
            return self._request("GET", path)
        except _MethodNotAllowed:
            return self._request("POST", path)

    def wait(self, job_id: str, on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job ends (COMPLETED, FAILED, CANCELLED, TIMED_OUT) or timeout_s passes; `on_poll` sees
        each answer (a progress line)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            body = self.status(job_id)
            if on_poll is not None:
                on_poll(body)
            if body.get("status") in FINAL:
                return body
            if time.monotonic() > deadline:
                raise EndpointError(f"job {job_id} did not finish within {self.timeout_s:.0f} s "
                                    f"(last status {body.get('status')})")
            time.sleep(self.poll_interval_s)

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        url = path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"
        attempts = self.retries + 1
        try:
            response = self._session.request(method, url, json=payload, timeout=(10, 120))
        except requests.RequestException as err:
            raise EndpointError(f"cannot reach {self.base_url} ({type(err).__name__}); "
                                f"gave up after {attempts} attempts") from None
        code = response.status_code
        if code == 200:
            try:
                return response.json()
            except ValueError:
                raise EndpointError(f"{url} answered 200 with a body that is not JSON") from None
        if code == 401:
            raise EndpointError("401 Unauthorized: the endpoint refused the API key; check RUNPOD_API_KEY")
        if code == 404:
            raise EndpointError(f"404 Not Found at {url}: check the endpoint id (--endpoint or "
                                "RUNPOD_ENDPOINT_ID) or --base-url")
        if code == 405:
            raise _MethodNotAllowed(url)
        if code in RETRY_STATUSES:
            raise EndpointError(f"{url} answered HTTP {code}; gave up after {attempts} attempts")
        raise EndpointError(f"{url} answered HTTP {code}: {response.text[:200]}")


class _MethodNotAllowed(EndpointError):
    pass


def endpoint_base(endpoint_id: str | None, base_url: str | None) -> str:
    """--base-url replaces the whole base; else RunPod's API base plus the endpoint id."""
    if base_url:
        return base_url
    if not endpoint_id:
        raise EndpointError("no endpoint: give --endpoint ID, set RUNPOD_ENDPOINT_ID, or give --base-url")
    return f"{RUNPOD_API}/{endpoint_id}"
