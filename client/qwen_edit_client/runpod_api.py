"""RunPod's REST API v2: the four calls `qwen-edit deploy` makes, and what each answer means.

Why this exists: creating an endpoint is RunPod's REST API v2 (`https://api.runpod.io`, a Bearer
key; its OpenAPI document is runpod/docs `api-reference-v2/openapi.json`, vendored in tests/ and
every body the tests send is validated against it).  The calls: `GET /v2/catalog/gpus` (each GPU
type's `pool` and `price.serverless`, USD per hour), `GET /v2/serverless` (the endpoints, to find
one by name), `POST /v2/serverless` (create, 201) and `PATCH /v2/serverless/{id}` (change only
what is sent, 200).  Errors are RunPod's problem documents (`title`, `status`, `detail`, and
`errors`: one line per field that failed validation); each becomes one line a person can act on.

Retries are urllib3's, as `qwen-edit edit` does them (endpoint.retrying_session): reads and the
PATCH (which sends the same body again) on 429, 500, 502, 503, 504 and on failed connections, with
exponential backoff and `Retry-After`; the create only on 429 and on a connection that never
opened: a create that reached RunPod is never sent twice (a second endpoint).  The key goes only
into the Authorization header; any text from the server is scrubbed of it before it is shown.
"""

from __future__ import annotations

from typing import Any

import requests
from urllib3.util import Retry

from .endpoint import RETRY_STATUSES, EndpointError, session_with

DEFAULT_URL = "https://api.runpod.io"
RETRIES = 5
BACKOFF_S = 0.5  # urllib3: no wait before the first retry, then 1, 2, 4, 8 s (Retry-After when RunPod sends it)
TIMEOUT = (10, 60)


class RunPodApiError(EndpointError):
    """RunPod refused a call (`status`: its HTTP status), or could not be reached (None); the message says what to
    do."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RunPodApi:
    """One account's serverless endpoints and GPU catalog. `calls` lists every request, sent or not, in order."""

    def __init__(self, base_url: str, api_key: str | None, retries: int | None = None,
                 backoff_s: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.calls: list[dict[str, Any]] = []
        self._key = api_key or ""
        retries = RETRIES if retries is None else retries
        backoff = BACKOFF_S if backoff_s is None else backoff_s
        self.attempts = retries + 1
        common = {"total": retries, "backoff_factor": backoff, "backoff_max": 30.0, "raise_on_status": False,
                  "respect_retry_after_header": True}
        self._reads = session_with(Retry(connect=retries, read=retries, status=retries,
                                         status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "PATCH"}),
                                         **common), api_key)
        self._creates = session_with(Retry(connect=retries, read=0, status=retries, status_forcelist=(429,),
                                           allowed_methods=frozenset({"POST"}), **common), api_key)

    def gpu_types(self) -> list[dict[str, Any]]:
        """Every GPU type in the catalog: `id`, `pool` (null: not serverless), `price.serverless` (USD/h)."""
        return list(self._call("GET", "/v2/catalog/gpus", None, "reading the GPU catalog")["gpus"])

    def endpoints(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v2/serverless", None, "listing your endpoints")["endpoints"])

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v2/serverless", body, f"creating endpoint {body.get('name')!r}")

    def update(self, endpoint_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", f"/v2/serverless/{endpoint_id}", body, f"updating endpoint {endpoint_id}")

    def note(self, method: str, path: str, body: dict[str, Any] | None) -> None:
        """Record a call that --dry-run leaves unsent."""
        self.calls.append({"method": method, "path": path, "body": body})

    def scrub(self, text: str) -> str:
        """`text` with the API key, should a server echo it, replaced."""
        return text.replace(self._key, "<RUNPOD_API_KEY>") if self._key else text

    def _call(self, method: str, path: str, body: dict[str, Any] | None, what: str) -> dict[str, Any]:
        self.note(method, path, body)
        session = self._creates if method == "POST" else self._reads
        try:
            response = session.request(method, f"{self.base_url}{path}", json=body, timeout=TIMEOUT)
        except requests.RequestException as err:
            raise RunPodApiError(self._unreachable(method, what, type(err).__name__)) from None
        code = response.status_code
        if code in (200, 201):
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise RunPodApiError(f"{what}: RunPod answered {code} with a body that is not a JSON object", code)
            return answer
        raise RunPodApiError(self.scrub(self._refusal(method, code, response, what)), code)

    def _unreachable(self, method: str, what: str, error: str) -> str:
        tries = "" if method == "POST" else f", {self.attempts} attempts"  # a create is not resent once it went out
        said = f"{what}: cannot reach {self.base_url} ({error}{tries}); check the network, or RUNPOD_API_URL"
        if method == "POST":  # the connection may have dropped after RunPod created it
            said += ("; the endpoint may have been created: run the same command again (it finds the endpoint "
                     "by name and updates it instead of making a second one)")
        return said

    def _refusal(self, method: str, code: int, response: requests.Response, what: str) -> str:
        problem = _problem(response)
        detail = problem.get("detail") or problem.get("title") or response.reason or ""
        fields = "; ".join(str(e) for e in problem.get("errors") or [])
        retried = code in RETRY_STATUSES and (method != "POST" or code == 429)
        times = f" {self.attempts} times" if retried and self.attempts > 1 else ""
        said = f"{what}: RunPod answered {code}{times}" + (f" ({detail})" if detail else "")
        if code == 401:
            return f"{said}: the API key was refused; check RUNPOD_API_KEY (or --api-key-file)"
        if code == 403:
            return f"{said}: the API key lacks this permission; give it read/write on Serverless (console, Settings, " \
                   "API Keys)"
        if code in (400, 422):
            return f"{said}" + (f": {fields}" if fields else "") + "; nothing was changed"
        if code == 404:
            return f"{said}: not found; list your endpoints in the console"
        if code in RETRY_STATUSES:
            said += "; try again in a few minutes"
            if method == "POST" and code != 429:
                said += ("; the endpoint may have been created: run the same command again (it finds the endpoint "
                         "by name and updates it)")
            return said
        return said


def _problem(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"detail": response.text[:200].strip()}
    return body if isinstance(body, dict) else {}
