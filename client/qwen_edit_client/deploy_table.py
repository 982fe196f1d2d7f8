"""What `qwen-edit deploy` knows of the worker without importing it: presets, pools, and what fits.

Why this exists: the client installs without the worker (no torch), yet a preset that cannot fit
the GPU class must be refused before anything is sent to RunPod.  The worker's side writes what is
needed once into deploy_table.json (`python -m qwen_edit_worker.placement.deploytable ...`): the
Hub's preset and pools per class, the CUDA versions hub.json allows, the worker's settings and
their defaults, the variants' repos, the smallest card of each pool, and the placement planner's
own byte counts.  This module reads it; `fit` makes the planner's one decision on those numbers
(tests/test_deploy_table.py checks it against the planner itself, every combination, every pool).

The container disk follows the image's size budget (docs/deploy.md, section 1): the bake's weights
(catalog.IMAGE_BYTES, the same bytes `qwen-edit plan --bake` reads) plus the measured rest of the
image (7.1 GB) plus about 10 GB of room to work, rounded up to 5 GB.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import catalog

TABLE_FILE = Path(__file__).with_name("deploy_table.json")
REST_OF_IMAGE_GB = 7.1  # measured: the image without weights (docs/deploy.md, "the rest")
ROOM_GB = 10.0  # room to work beside the image (docs/deploy.md: containerDiskInGb)
FP8 = "fp8"


@functools.cache
def table() -> dict[str, Any]:
    return json.loads(TABLE_FILE.read_text())


def classes() -> list[str]:
    """The GPU classes with a Hub preset ("24", "48", "80", "141"), smallest first."""
    return sorted(table()["hub"]["classes"], key=int)


def gpu_class(name: str) -> dict[str, Any]:
    """A class's pools, its preset's name and its preset's settings (`env`)."""
    try:
        return table()["hub"]["classes"][name]
    except KeyError:
        raise ValueError(f"--gpu-class: one of {', '.join(classes())} (GB), got {name!r}") from None


def variants() -> dict[str, str]:
    """Variant -> the Hugging Face repo of its weights (what a slim image's Model field must name)."""
    return table()["variants"]


def settings() -> dict[str, str]:
    """Every setting the worker reads -> its default, as the environment would spell it."""
    return table()["settings"]


def disk_gb(bake: str) -> int:
    """Container disk for an image baked `bake`: weights + the rest of the image + room, rounded up to 5 GB."""
    image = catalog.IMAGE_BYTES[bake] / 1e9 + REST_OF_IMAGE_GB
    return int(math.ceil((image + ROOM_GB) / 5) * 5)


def fp8_pools(pools: list[str]) -> list[str]:
    """The pools whose every card runs fp8 (Ada or Hopper)."""
    return [pool for pool in pools if table()["pools"][pool]["fp8"]]


@dataclass(frozen=True)
class Fit:
    """The placement a worker would plan on a pool's smallest card, from the planner's numbers."""

    pool: str
    card: str
    gpu_bytes: int
    fits: bool
    offload: str  # the placement: as set, or the fastest that fits (OFFLOAD=auto)
    need_bytes: int  # GPU bytes it needs for the base job (1 MP, one picture, one image)
    forced: bool  # OFFLOAD was set (not auto)

    def line(self) -> str:
        gb = f"{self.need_bytes / 1e9:.1f} GB needed of {self.gpu_bytes / 1e9:.1f} GB"
        where = f"{self.pool} (smallest card: {self.card})"
        if self.fits:
            how = "as set" if self.forced else "the fastest that fits"
            return f"{where}: OFFLOAD={self.offload} ({how}), {gb} for a 1 MP job"
        if self.forced:
            return f"{where}: OFFLOAD={self.offload} does NOT fit: {gb} for a 1 MP job (OFFLOAD=auto picks one " \
                   "that fits)"
        return f"{where}: nothing fits, not even OFFLOAD=group: {gb} for a 1 MP job"


def value(env: Mapping[str, str], name: str) -> str:
    """A setting as the worker will read it: the env's value, else its default; checked when the fit needs it."""
    text = (env.get(name) or "").strip() or settings()[name]
    choices = table()["choices"].get(name)
    if choices is not None and text.lower() not in choices:
        raise ValueError(f"{name}={text}: the worker takes one of {', '.join(choices)}")
    return text.lower() if choices is not None else text


def fit(pool: str, env: Mapping[str, str], variant: str) -> Fit:
    """What the worker's planner decides for these settings on `pool`'s smallest card."""
    data = table()
    card = data["pools"][pool]
    precision, text, offload = value(env, "PRECISION"), value(env, "TEXT_ENCODER_PRECISION"), value(env, "OFFLOAD")
    saving, checker = value(env, "MEMORY_SAVING"), value(env, "SAFETY_CHECKER")
    tiled = saving == "on" or (saving == "auto" and card["bytes"] < data["large_gpu_bytes"])
    key = f"{precision}/{text}/{'no checker' if checker == 'off' else 'checker'}"
    needs = dict(zip(data["modes"], data["need_bytes"][variant][key]["tiled" if tiled else "untiled"], strict=True))
    if offload != "auto":
        return Fit(pool, card["card"], card["bytes"], needs[offload] <= card["bytes"], offload, needs[offload], True)
    for mode, need in needs.items():
        if need <= card["bytes"]:
            return Fit(pool, card["card"], card["bytes"], True, mode, need, False)
    return Fit(pool, card["card"], card["bytes"], False, "group", needs["group"], False)
