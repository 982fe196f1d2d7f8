"""`qwen-edit cost`: what an image really costs, from the logs `qwen-edit edit` writes.

Why this exists: the worker reports each job's execution cost, but a flex worker also bills the
seconds it spends starting (cold starts) and idling after a job (the endpoint's idle timeout).
This report reads one or more JSON Lines logs and prints cost per image (mean, p50, p95),
execution and delay times, the share of cold starts, and cost per image including idle and
cold-start seconds.  Every log the client writes gives a report: where RunPod's figures are
missing (a worker's local API) the worker's own `timing` is used, and the report says which
source each figure came from (figures.py).  The billing model, stated so it can be checked:
- execution: each job's execution seconds;
- idle: after each job the worker idles until the next job is submitted, at most the idle timeout
  (the last job idles the whole timeout); one worker is assumed (`qwen-edit plan` simulates more);
- cold start: the delay of jobs whose timing says cold_start (an upper bound: it includes any
  queue wait before the worker existed).
Percentiles are nearest-rank (stats.py).  Also the short summary `qwen-edit edit` prints.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import figures
from .stats import percentile, summary


def read_logs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{number} is not a JSON line") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number} is not a JSON object")
                records.append(record)
    return sorted(records, key=lambda r: r.get("finished_at") or r.get("submitted_at") or "")


def log_price(records: Iterable[dict[str, Any]], price: float | None) -> float | None:
    """--price when given, else the one GPU price the logs carry (None if none, or several)."""
    if price is not None:
        return price
    prices = {p for r in records if (p := figures.worker_price(r))}
    return prices.pop() if len(prices) == 1 else None


def _sources(pairs: Iterable[tuple[float | None, str | None]]) -> dict[str, int]:
    return dict(Counter(source for value, source in pairs if value is not None))


def cost_report(records: list[dict[str, Any]], idle_timeout_s: float, price: float | None = None) -> dict[str, Any]:
    """The report's figures (see the module docstring for the billing model)."""
    done = [r for r in records if r.get("status") == "COMPLETED"]
    ran = [r for r in records if figures.execution_s(r)[0] is not None]
    price = log_price(ran, price)
    execution = [figures.execution_s(r) for r in ran]
    delay = [figures.delay_s(r) for r in ran]
    per_image = [figures.usd_per_image(r, price) for r in done]
    cold = [d for r, d in zip(ran, delay, strict=True) if figures.cold_start(r)]
    cold_s = sum(value or 0.0 for value, _ in cold)
    idle_s = 0.0
    for index, current in enumerate(ran):
        following = ran[index + 1] if index + 1 < len(ran) else None
        gap = idle_timeout_s
        end, next_start = figures.when(current.get("finished_at")), figures.when((following or {}).get("submitted_at"))
        if end is not None and next_start is not None:
            gap = min(idle_timeout_s, max(0.0, (next_start - end).total_seconds()))
        idle_s += gap
    execution_total = sum(value for value, _ in execution if value is not None)
    billed = execution_total + idle_s + cold_s
    images = sum(figures.images(r) for r in done)
    return {
        "jobs": len(records), "completed": len(done), "failed": len(records) - len(done), "images": images,
        "usd_per_image": summary([v for v, _ in per_image if v is not None]),
        "execution_s": summary([v for v, _ in execution if v is not None]),
        "delay_s": summary([v for v, _ in delay if v is not None]),
        "cold_start_share": len(cold) / len(ran) if ran else None,
        "usd_per_second": price,
        "billed_s": {"execution": execution_total, "idle": idle_s, "cold_start": cold_s, "total": billed},
        "usd_per_image_all_in": None if price is None or not images else billed * price / images,
        "idle_timeout_s": idle_timeout_s,
        "sources": {"execution_s": _sources(execution), "delay_s": _sources(delay),
                    "usd_per_image": _sources(per_image), "cold_start_s": _sources(cold)},
    }


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _said(sources: dict[str, int]) -> str:
    return "  [" + ", ".join(f"{name}: {count}" for name, count in sources.items()) + "]" if sources else ""


def format_report(report: dict[str, Any]) -> str:
    def row(name: str, key: str, digits: int) -> str:
        stats = report[key]
        return (f"{name:<28} mean {_num(stats['mean'], digits):>10}  p50 {_num(stats['p50'], digits):>10}  "
                f"p95 {_num(stats['p95'], digits):>10}" + _said(report["sources"][key]))

    billed = report["billed_s"]
    share = report["cold_start_share"]
    lines = [
        f"jobs {report['jobs']} (completed {report['completed']}, failed {report['failed']}), "
        f"images {report['images']}",
        row("cost per image (USD)", "usd_per_image", 5),
        row("execution time (s)", "execution_s", 2),
        row("delay time (s)", "delay_s", 2),
        f"{'cold starts':<28} {_num(None if share is None else share * 100, 1)}%",
        f"{'billed seconds':<28} execution {billed['execution']:.1f} + idle {billed['idle']:.1f} + cold start "
        f"{billed['cold_start']:.1f} = {billed['total']:.1f} (idle timeout {report['idle_timeout_s']:g} s)"
        + _said(report["sources"]["cold_start_s"]),
        f"{'cost per image, all in (USD)':<28} {_num(report['usd_per_image_all_in'], 5)}"
        + ("" if report["usd_per_second"] else "  (no GPU price in the logs: pass --price)"),
    ]
    return "\n".join(lines)


def edit_summary(records: list[dict[str, Any]], price: float | None) -> dict[str, Any]:
    """What `qwen-edit edit` prints at the end: images, total, mean and p95 per image, failures."""
    done = [r for r in records if r.get("status") == "COMPLETED"]
    costs = [(figures.usd_per_image(r, price)[0], figures.images(r)) for r in done]
    known = [(usd, count) for usd, count in costs if usd is not None]
    per_image = [usd for usd, count in known for _ in range(count)]
    return {"images": sum(figures.images(r) for r in done), "failures": len(records) - len(done),
            "usd_total": sum(usd * count for usd, count in known) if known else None,
            "usd_per_image_mean": sum(per_image) / len(per_image) if per_image else None,
            "usd_per_image_p95": percentile(per_image, 95), "priced_images": len(per_image)}


def format_edit_summary(result: dict[str, Any]) -> str:
    text = (f"{result['images']} images, total ${_num(result['usd_total'], 5)}, per image mean "
            f"${_num(result['usd_per_image_mean'], 5)} p95 ${_num(result['usd_per_image_p95'], 5)}, "
            f"{result['failures']} failed")
    if result["priced_images"] < result["images"]:
        text += f" ({result['images'] - result['priced_images']} images without a GPU price: pass --price)"
    return text
