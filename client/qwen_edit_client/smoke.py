"""The first job on a new or changed endpoint: the check that it serves, and what an edit costs there.

Why this exists: a deployment is done when an edit comes back, not when RunPod answers 201.
`qwen-edit deploy` sends the repository's test_input.json edit (a small picture, 0.0625 MP, seed
42; vendored here as smoke_input.json, a test keeps the two equal) to the endpoint's own request
URLs from RunPod's answer: `run` then `status` polled for a queue endpoint, `base` + `/runsync`
for a load-balancing one.  It prints what `qwen-edit edit` prints for a job: RunPod's `delayTime`
(queue plus cold start) and `executionTime`, the worker's `timing.cold_start` and `cost`; a job
that fails shows the worker's error.  Retries (429, 5xx) are EndpointClient's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import figures
from .endpoint import EndpointClient, EndpointError

INPUT_FILE = Path(__file__).with_name("smoke_input.json")
TIMEOUT_S = 1800.0  # a first worker may pull the image and read the model before it answers
POLL_S = 2.0  # between status polls


def job() -> dict[str, Any]:
    return json.loads(INPUT_FILE.read_text())


def run(endpoint: dict[str, Any], api_key: str | None,
        on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Send the job to `endpoint` (RunPod's Endpoint object); the record `qwen-edit edit` would log, images left out."""
    urls = endpoint.get("requestUrls") or {}
    poll_interval_s = POLL_S
    started = time.monotonic()
    record: dict[str, Any] = {"endpoint": endpoint.get("id")}
    try:
        if "run" in urls and "status" in urls:
            client = EndpointClient(urls["run"].rsplit("/", 1)[0], api_key, poll_interval_s=poll_interval_s,
                                    timeout_s=TIMEOUT_S, run_url=urls["run"], status_url=urls["status"])
            job_id = client.submit(job())
            record["job_id"] = job_id
            body = client.wait(job_id, on_poll)
        elif "base" in urls:
            client = EndpointClient(urls["base"], api_key, poll_interval_s=poll_interval_s, timeout_s=TIMEOUT_S)
            body = client.run_sync(job())
        else:
            raise EndpointError(f"RunPod's answer has no request URLs for endpoint {endpoint.get('id')}")
    except EndpointError as err:
        return record | {"status": "ERROR", "error": str(err), "seconds": round(time.monotonic() - started, 1)}
    output = body.get("output") or {}
    record.update(job_id=body.get("id", record.get("job_id")), status=body.get("status"),
                  delayTime=body.get("delayTime"), executionTime=body.get("executionTime"),
                  timing=output.get("timing"), cost=output.get("cost"),
                  outputs=[item.get("format") for item in output.get("images") or []],
                  seconds=round(time.monotonic() - started, 1))
    if body.get("status") != "COMPLETED":
        record["error"] = str(body.get("error") or f"job ended {body.get('status')}")
    return record


def describe(record: dict[str, Any]) -> str:
    """One line: status, RunPod's times, cold start, cost; or the error."""
    head = f"smoke job {record.get('job_id') or ''}".rstrip() + f": {record.get('status')}"
    if record.get("status") != "COMPLETED":
        return f"{head}: {record.get('error')}"
    delay, execution = figures.delay_s(record), figures.execution_s(record)
    usd, source = figures.usd_per_image(record, None)

    def seconds(figure: figures.Figure) -> str:
        return "n/a" if figure[0] is None else f"{figure[0]:.2f} s ({figure[1]})"

    cold = "yes" if figures.cold_start(record) else "no"
    cost = "n/a (the worker reports no GPU price)" if usd is None else f"${usd:.5f} per image ({source})"
    return (f"{head}, delay {seconds(delay)}, execution {seconds(execution)}, cold start {cold} "
            f"(timing.cold_start), cost {cost}")
