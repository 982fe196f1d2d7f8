"""`qwen-edit cost`: what an image really costs, from the logs `qwen-edit edit` writes.

Why this exists: the worker reports each job's execution cost, but a flex worker also bills the
seconds it spends starting (cold starts) and idling after a job (the endpoint's idle timeout).
This report reads one or more JSON Lines logs and prints cost per image (mean, p50, p95), RunPod's
execution and delay times, the share of cold starts, and cost per image including idle and
cold-start seconds.  The billing model, stated so it can be checked:
- execution: each job's executionTime (RunPod's figure);
- idle: after each job the worker idles until the next job is submitted, at most the idle timeout
  (the last job idles the whole timeout); one worker is assumed;
- cold start: the delayTime of jobs whose timing says cold_start (an upper bound: it includes any
  queue wait before the worker existed).
Percentiles are nearest-rank.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_logs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{number} is not a JSON line") from None
    return sorted(records, key=lambda r: r.get("finished_at") or r.get("submitted_at") or "")


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None, "p50": percentile(values, 50),
            "p95": percentile(values, 95)}


def _time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def cost_report(records: list[dict[str, Any]], idle_timeout_s: float, price: float | None = None) -> dict[str, Any]:
    """The report's figures (see the module docstring for the billing model)."""
    done = [r for r in records if r.get("status") == "COMPLETED"]
    ran = [r for r in records if r.get("executionTime") is not None]
    images = sum(len(r.get("outputs", [])) for r in done)
    per_image = [r["cost"]["usd_per_image"] for r in done if (r.get("cost") or {}).get("usd_per_image") is not None]
    prices = {r["cost"]["usd_per_second"] for r in ran if (r.get("cost") or {}).get("usd_per_second")}
    price = price if price is not None else (prices.pop() if len(prices) == 1 else None)
    execution = sum(r["executionTime"] for r in ran) / 1000
    cold = [r for r in ran if (r.get("timing") or {}).get("cold_start")]
    cold_s = sum((r.get("delayTime") or 0) for r in cold) / 1000
    idle_s = 0.0
    for current, following in zip(ran, [*ran[1:], None], strict=True):
        gap = idle_timeout_s
        if following is not None and current.get("finished_at") and following.get("submitted_at"):
            seconds = (_time(following["submitted_at"]) - _time(current["finished_at"])).total_seconds()
            gap = min(idle_timeout_s, max(0.0, seconds))
        idle_s += gap
    billed = execution + idle_s + cold_s
    return {
        "jobs": len(records), "completed": len(done), "failed": len(records) - len(done), "images": images,
        "usd_per_image": summary(per_image),
        "execution_s": summary([r["executionTime"] / 1000 for r in ran]),
        "delay_s": summary([r["delayTime"] / 1000 for r in ran if r.get("delayTime") is not None]),
        "cold_start_share": len(cold) / len(ran) if ran else None,
        "usd_per_second": price,
        "billed_s": {"execution": execution, "idle": idle_s, "cold_start": cold_s, "total": billed},
        "usd_per_image_all_in": None if price is None or not images else billed * price / images,
        "idle_timeout_s": idle_timeout_s,
    }


def format_report(report: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def row(name: str, stats: dict[str, float | None], digits: int) -> str:
        return f"{name:<28} mean {num(stats['mean'], digits):>10}  p50 {num(stats['p50'], digits):>10}  " \
               f"p95 {num(stats['p95'], digits):>10}"

    billed = report["billed_s"]
    share = report["cold_start_share"]
    lines = [
        f"jobs {report['jobs']} (completed {report['completed']}, failed {report['failed']}), "
        f"images {report['images']}",
        row("cost per image (USD)", report["usd_per_image"], 5),
        row("execution time (s)", report["execution_s"], 2),
        row("delay time (s)", report["delay_s"], 2),
        f"{'cold starts':<28} {num(None if share is None else share * 100, 1)}%",
        f"{'billed seconds':<28} execution {billed['execution']:.1f} + idle {billed['idle']:.1f} + cold start "
        f"{billed['cold_start']:.1f} = {billed['total']:.1f} (idle timeout {report['idle_timeout_s']:g} s)",
        f"{'cost per image, all in (USD)':<28} {num(report['usd_per_image_all_in'], 5)}"
        + ("" if report["usd_per_second"] else "  (no GPU price in the logs: pass --price)"),
    ]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Cost per image and latency (delay + execution) per job over time, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'qwen-edit-worker[plot]'") from None
    done = [r for r in records if r.get("status") == "COMPLETED" and r.get("finished_at")]
    when = [_time(r["finished_at"]) for r in done]
    cost = [(r.get("cost") or {}).get("usd_per_image") for r in done]
    latency = [((r.get("delayTime") or 0) + (r.get("executionTime") or 0)) / 1000 for r in done]
    cold = [bool((r.get("timing") or {}).get("cold_start")) for r in done]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(when, [c if c is not None else float("nan") for c in cost], marker="o")
    top.set_ylabel("USD per image")
    top.set_title("Cost and latency per job")
    bottom.scatter(when, latency, c=["tab:red" if c else "tab:blue" for c in cold])
    bottom.set_ylabel("delay + execution (s)")
    bottom.set_xlabel("job finished (red: cold start)")
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
