"""Working and output sizes: how many pixels the model works on, at the input's aspect ratio.

Why this exists: the edit's cost grows with its area (image tokens), so the area is a request
parameter (`megapixels`, or explicit `width` and `height`).  The output keeps the aspect ratio of
the last input picture (the one the pipelines size their output from), in multiples of 16 (the
VAE's factor 8 times the transformer's 2x2 patches).  One megapixel here is 1024*1024 pixels, the
area the pipelines use by default, so `megapixels: 1` reproduces their usual size.  A `size` of
"W*H" (the form of RunPod's public Qwen edit endpoints) asks for an exact output, which may be off
the 16-pixel grid (their `1536*1080`): the model then works at the nearest size on the grid and
the decoded picture is resized to exactly W x H before encoding.  Pure arithmetic, no torch.
"""

from __future__ import annotations

import math
import re

MEGAPIXEL = 1024 * 1024  # the pipelines' own "1 MP" (their default working area)
MULTIPLE = 16
MIN_SIDE = 64
MAX_SIDE = 2048
_SIZE = re.compile(r"\s*([0-9]{1,5})\s*\*\s*([0-9]{1,5})\s*")


def output_size(aspect: float, megapixels: float) -> tuple[int, int]:
    """(width, height) of about `megapixels` MP at `aspect` (width / height), each side 64..2048."""
    area = megapixels * MEGAPIXEL
    width = math.sqrt(area * aspect)
    height = width / aspect
    # Keep both sides within bounds, preserving the aspect ratio as far as the bounds allow.
    scale = min(1.0, MAX_SIDE / width, MAX_SIDE / height)
    scale = max(scale, MIN_SIDE / width, MIN_SIDE / height)
    return _snap(width * scale), _snap(height * scale)


def working_area(size: tuple[int, int] | None, megapixels: float) -> int:
    """The request's area in pixels: explicit width x height, else `megapixels` (1 MP = 1024*1024)."""
    return size[0] * size[1] if size is not None else int(megapixels * MEGAPIXEL)


def _snap(side: float) -> int:
    return int(min(MAX_SIDE, max(MIN_SIDE, round(side / MULTIPLE) * MULTIPLE)))


def parse_size(text: str) -> tuple[int, int] | None:
    """(width, height) from "W*H" with both sides within 64..2048; None for anything else."""
    match = _SIZE.fullmatch(text)
    if match is None:
        return None
    width, height = int(match[1]), int(match[2])
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        return None
    return width, height


def nearest_working_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size the model works at for an exact `size`: each side to the nearest multiple of 16 (ties up)."""
    return _nearest(size[0]), _nearest(size[1])


def _nearest(side: int) -> int:
    return int(min(MAX_SIDE, max(MIN_SIDE, (side + MULTIPLE // 2) // MULTIPLE * MULTIPLE)))
