"""What one log record says about time and money, and where each figure came from.

Why this exists: the logs `qwen-edit edit` writes do not all carry the same fields.  Through
RunPod's API a record has RunPod's `delayTime` and `executionTime`; through a worker's local API
(`python handler.py --rp_serve_api`) it has only the worker's own `timing` and `cost`, and a
request that never reached a worker has neither.  Every reader goes through these functions, so
every log gives figures, each with its source:
- execution: RunPod `executionTime`, else the worker's `timing.total_ms`;
- delay (queue plus cold start): RunPod `delayTime`, else the client's clock (finished_at minus
  submitted_at, minus the execution);
- cost per image: the worker's `cost.usd_per_image`, else execution x the given price / images.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

RUNPOD_EXECUTION = "RunPod executionTime"
WORKER_TIMING = "worker timing.total_ms"
RUNPOD_DELAY = "RunPod delayTime"
CLIENT_CLOCK = "client clock (round trip - execution)"
WORKER_COST = "worker cost.usd_per_image"
PRICE_TIMES_EXECUTION = "execution x price"

Figure = tuple[float | None, str | None]  # (value, source); (None, None) when the record cannot say


def when(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def execution_s(record: dict[str, Any]) -> Figure:
    if record.get("executionTime") is not None:
        return record["executionTime"] / 1000, RUNPOD_EXECUTION
    total_ms = (record.get("timing") or {}).get("total_ms")
    if total_ms is not None:
        return total_ms / 1000, WORKER_TIMING
    return None, None


def delay_s(record: dict[str, Any]) -> Figure:
    if record.get("delayTime") is not None:
        return record["delayTime"] / 1000, RUNPOD_DELAY
    execution, _ = execution_s(record)
    start, end = when(record.get("submitted_at")), when(record.get("finished_at"))
    if execution is None or start is None or end is None:
        return None, None
    return max(0.0, (end - start).total_seconds() - execution), CLIENT_CLOCK


def cold_start(record: dict[str, Any]) -> bool:
    return bool((record.get("timing") or {}).get("cold_start"))


def images(record: dict[str, Any]) -> int:
    return len(record.get("outputs") or []) if record.get("status") == "COMPLETED" else 0


def usd_per_image(record: dict[str, Any], price: float | None) -> Figure:
    """The worker's own figure when it has one; else execution x price (None without a price)."""
    worker = (record.get("cost") or {}).get("usd_per_image")
    if worker is not None:
        return float(worker), WORKER_COST
    execution, _ = execution_s(record)
    count = images(record)
    if price is None or execution is None or not count:
        return None, None
    return execution * price / count, PRICE_TIMES_EXECUTION


def worker_price(record: dict[str, Any]) -> float | None:
    return (record.get("cost") or {}).get("usd_per_second")
