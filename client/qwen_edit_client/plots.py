"""The PNG charts: cost and latency per job (`qwen-edit cost --plot`), and cost per image against
p95 latency per endpoint configuration (`qwen-edit plan --plot`).

Why this exists: a picture shows where the money goes faster than a table.  matplotlib is an
optional extra (`pip install 'qwen-edit-client[plot]'`), imported only here and only when asked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import figures


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'qwen-edit-client[plot]'") from None
    return plt


def plot_jobs(records: list[dict[str, Any]], path: Path, price: float | None = None) -> None:
    """Cost per image and latency (delay + execution) per finished job over time."""
    plt = _pyplot()
    done = [r for r in records if r.get("status") == "COMPLETED" and r.get("finished_at")]
    at = [figures.when(r["finished_at"]) for r in done]
    cost = [figures.usd_per_image(r, price)[0] for r in done]
    latency = [(figures.delay_s(r)[0] or 0.0) + (figures.execution_s(r)[0] or 0.0) for r in done]
    sources = sorted({s for r in done for s in (figures.execution_s(r)[1], figures.delay_s(r)[1]) if s})
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(at, [math.nan if c is None else c for c in cost], marker="o")
    top.set_ylabel("USD per image")
    if done and all(c is None for c in cost):
        top.text(0.5, 0.5, "no GPU price in the log: pass --price", transform=top.transAxes, ha="center")
    top.set_title("Cost and latency per job" if done else "Cost and latency per job (no finished jobs in the log)")
    bottom.scatter(at, latency, c=["tab:red" if figures.cold_start(r) else "tab:blue" for r in done])
    bottom.set_ylabel("delay + execution (s)")
    bottom.set_xlabel("job finished (red: cold start); times from " + (", ".join(sources) or "nothing"))
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_plan(results: list[dict[str, Any]], recommended: dict[str, Any] | None, path: Path,
              p95_target: float | None) -> None:
    """One point per configuration: p95 latency (x) against cost per image all in (y)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 6))
    gpus = sorted({r["config"]["gpu"] for r in results})
    for gpu in gpus:
        mine = [r for r in results if r["config"]["gpu"] == gpu]
        axes.scatter([r["latency_s"]["p95"] for r in mine], [r["usd_per_image"] for r in mine], label=gpu, alpha=0.7)
    if recommended is not None:
        axes.scatter([recommended["latency_s"]["p95"]], [recommended["usd_per_image"]], s=260, facecolors="none",
                     edgecolors="black", linewidths=2, label="recommended")
        axes.annotate(label(recommended["config"]), (recommended["latency_s"]["p95"], recommended["usd_per_image"]),
                      textcoords="offset points", xytext=(-12, 12), ha="right", fontsize=8)
    if p95_target is not None:
        axes.axvline(p95_target, color="grey", linestyle="--", label=f"p95 target {p95_target:g} s")
    axes.set_xlabel("p95 latency: queue + cold start + execution (s)")
    axes.set_ylabel("USD per image, all in")
    if all(r["latency_s"]["p95"] > 0 and (r["usd_per_image"] or 0) > 0 for r in results):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        axes.set_xscale("log")
        axes.set_yscale("log")
        for axis, shape in ((axes.xaxis, "{:g} s"), (axes.yaxis, "${:.2g}")):
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda value, _, shape=shape: shape.format(value)))
            axis.set_minor_formatter(NullFormatter())
    axes.set_title(f"qwen-edit plan: {len(results)} endpoint configurations")
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def label(config: dict[str, Any]) -> str:
    return (f"{config['gpu']} max {config['max_workers']} active {config['active_workers']} "
            f"idle {config['idle_timeout_s']:g}s {'FlashBoot' if config['flashboot'] else 'no FlashBoot'}")
