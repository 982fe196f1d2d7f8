"""Percentiles and summaries, one definition for the cost report, the edit summary and the planner.

Why this exists: the three must agree on what "p95" means.  Nearest rank: the smallest value with
at least q% of the values at or below it (so p95 of 20 values is the 19th smallest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": sum(values) / len(values) if values else None, "p50": percentile(values, 50),
            "p95": percentile(values, 95)}
