"""What the planner knows without a log: RunPod's GPU classes, their prices, how long a job takes
on each, and how long a worker takes to start.

Why this exists: `qwen-edit plan` needs a price and an execution time per GPU class, and every
figure must say where it came from.  Sources, November 2026:
- flex prices: RunPod's serverless price table (the repository's facts.md, section 8);
- active prices: RunPod's pricing page (docs.runpod.io/serverless/pricing) lists an always-on
  ("active") price per class, 20-32% under the flex price.  The discount used is that ratio,
  or DEFAULT_ACTIVE_DISCOUNT (20%, the low end of RunPod's "20-30%") where no active price is
  published; `--active-discount` replaces it for every class;
- execution seconds: one 1 MP, 3-step edit-2511 job on a warm worker, from docs/benchmarks.md
  ("Cost per image by RunPod GPU class").  Each row is marked measured or derived as that page
  marks it; today every GPU figure there is derived (FLOPs and published anchors), none measured.
  The FLOPs are the real graph's (real_graph_flops.json, written by the worker's harness:
  `python -m qwen_edit_worker.placement.flopstable ...`; this client reads the file and
  never imports torch).  Classes without a figure take --exec or a log's times;
- cold start: without FlashBoot, `cold_start_s(bake)`: the container's start (CONTAINER_START_S,
  assumed) plus the bake's bytes (IMAGE_BYTES: the real configs counted, docs/benchmarks.md "Bytes
  that decide cold start") read at a local NVMe's rate (NVME_BYTES_PER_S, assumed), times
  READY_OVER_READ, MEASURED at real shape (bench/coldstart --real-shape on a 2-core VM, 2026-12-03:
  the worker ready within 1.12-1.19x of the larger of the raw read and its start without a disk;
  at the whole model's bytes the read is the larger): bf16 (the Hub's build) ~40 s, a fused int8 or
  fp8 bake ~23 s.  With FlashBoot, RunPod restores a recent snapshot in seconds (5 s assumed, not
  measured).  Both are options (--bake, --cold-start, --flashboot-cold-start).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_ACTIVE_DISCOUNT = 0.20
CONTAINER_START_S = 5.0  # assumed: the container and Python up before the worker's own start
NVME_BYTES_PER_S = 2e9  # assumed: a local NVMe's sequential read
READY_OVER_READ = 1.2  # measured (docs/benchmarks.md, cold start at real shape): ready over the raw read, at most
# Weights a bake reads at start (docs/benchmarks.md "Bytes that decide cold start"; bf16 with its Lightning file).
IMAGE_BYTES = {"bf16": 57.70e9 + 1.18e9, "int8": 30.24e9, "fp8": 30.23e9}
BAKES = tuple(IMAGE_BYTES)
FLASHBOOT_COLD_START_S = 5.0


def cold_start_s(bake: str = "bf16") -> float:
    """A cold start without FlashBoot for an image baked `bake` (DERIVED: see the module's docstring)."""
    return round(CONTAINER_START_S + READY_OVER_READ * IMAGE_BYTES[bake] / NVME_BYTES_PER_S, 1)


COLD_START_S = cold_start_s("bf16")
BENCHMARKS = "docs/benchmarks.md"
FLOPS_FILE = Path(__file__).with_name("real_graph_flops.json")


@dataclass(frozen=True)
class GpuClass:
    name: str  # what --gpu takes
    runpod_class: str  # RunPod's name for the class, as docs/benchmarks.md writes it
    flex_usd_s: float
    active_usd_s: float | None  # RunPod's published active price; None: not published
    job_s: float | None = None  # execution seconds of a 1 MP, 3-step job; None: no figure
    job_source: str | None = None  # "measured" or "derived", as docs/benchmarks.md says
    settings: str = ""  # the worker settings the figure is for (the benchmarks table's column)

    @property
    def published_discount(self) -> float:
        return DEFAULT_ACTIVE_DISCOUNT if self.active_usd_s is None else 1 - self.active_usd_s / self.flex_usd_s


GPU_CLASSES: dict[str, GpuClass] = {g.name: g for g in (
    GpuClass("a4000", "16 GB (A4000)", 0.00016, 0.00011),
    GpuClass("a5000", "24 GB (L4, A5000, 3090)", 0.00019, 0.00013),
    GpuClass("a5000-int8", "24 GB (A5000, 3090)", 0.00019, 0.00013, 5.0, "derived",
             "int8, `OFFLOAD=text_encoder`"),
    GpuClass("4090", "24 GB PRO (4090)", 0.00031, 0.00021),
    GpuClass("4090-int8", "24 GB PRO (4090)", 0.00031, 0.00021, 2.5, "derived", "int8, `OFFLOAD=text_encoder`"),
    GpuClass("a6000", "48 GB (A6000)", 0.00034, 0.00024, 9.9, "derived", "bf16, `OFFLOAD=model` (no fp8 on Ampere)"),
    GpuClass("a6000-int8", "48 GB (A6000)", 0.00034, 0.00024, 3.8, "derived", "int8, no offload"),
    GpuClass("l40s", "48 GB PRO (L40S)", 0.00053, 0.00037, 5.9, "derived", "bf16, `OFFLOAD=model`"),
    GpuClass("l40s-fp8", "48 GB PRO (L40S)", 0.00053, 0.00037, 2.2, "derived", "fp8, no offload"),
    GpuClass("l40s-int8", "48 GB PRO (L40S)", 0.00053, 0.00037, 2.0, "derived", "int8, no offload"),
    GpuClass("a100", "80 GB (A100)", 0.00076, 0.00060, 4.0, "derived", "bf16"),
    GpuClass("a100-int8", "80 GB (A100)", 0.00076, 0.00060, 2.2, "derived", "int8"),
    GpuClass("h100", "80 GB PRO (H100)", 0.00116, 0.00093, 1.4, "derived", "bf16"),
    GpuClass("h100-fp8", "80 GB PRO (H100)", 0.00116, 0.00093, 1.3, "derived", "fp8"),
    GpuClass("rtxpro6000", "96 GB (RTX PRO 6000)", 0.00111, None),
    GpuClass("h200", "141 GB (H200)", 0.00155, 0.00124, 1.3, "derived", "bf16"),
    GpuClass("b200", "180 GB (B200)", 0.00240, 0.00190),
)}


# The serverless GPU pool each class is served from (RunPod's docs, references/gpu-types.mdx, "GPU pools"):
# `qwen-edit deploy` simulates the classes in the pools it deploys to.  The RTX PRO 6000 and B200 pools are
# newer than that page; their ids follow RunPod's naming (facts.md section 13).
POOLS: dict[str, str] = {
    "a4000": "AMPERE_16", "a5000": "AMPERE_24", "a5000-int8": "AMPERE_24", "4090": "ADA_24", "4090-int8": "ADA_24",
    "a6000": "AMPERE_48", "a6000-int8": "AMPERE_48", "l40s": "ADA_48_PRO", "l40s-fp8": "ADA_48_PRO",
    "l40s-int8": "ADA_48_PRO", "a100": "AMPERE_80", "a100-int8": "AMPERE_80", "h100": "ADA_80_PRO",
    "h100-fp8": "ADA_80_PRO", "rtxpro6000": "BLACKWELL_96", "h200": "HOPPER_141", "b200": "BLACKWELL_180",
}


def gpu_class(name: str) -> GpuClass:
    try:
        return GPU_CLASSES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"--gpu: unknown GPU class {name!r}; one of {', '.join(GPU_CLASSES)}") from None


def with_figures() -> list[str]:
    """The classes that have an execution figure (the default --grid over GPU classes)."""
    return [g.name for g in GPU_CLASSES.values() if g.job_s is not None]


@functools.cache
def real_graph_flops() -> dict[str, Any]:
    """The worker's real-graph FLOP table: `source` (the command that wrote it) and one row per job."""
    return json.loads(FLOPS_FILE.read_text())


def job_tflop(variant: str = "edit-2511", megapixels: float = 1.0, phase: str | None = None) -> float:
    """TFLOP of one job (3 steps, all phases), or of one `phase` (`denoise`: one pass), from the real graph."""
    for row in real_graph_flops()["rows"]:
        if row["variant"] == variant and row["megapixels"] == megapixels:
            return float(row["job_tflop"] if phase is None else row["tflop"][phase])
    raise ValueError(f"no real-graph FLOPs for {variant} at {megapixels:g} MP in {FLOPS_FILE.name}")


def flops_label() -> str:
    """Where the execution figures' FLOPs come from, for the plan's output."""
    return f"from {job_tflop():.0f} TFLOP a 1 MP edit-2511 job, {real_graph_flops()['source']}"
