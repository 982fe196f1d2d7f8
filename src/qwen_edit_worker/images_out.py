"""Encoding the edited pictures for the job's output.

Why this exists: every millisecond of a job is billed, and encoding is the part of the job the
GPU does not do.  The encoder settings here favour speed where the size cost is small (PNG at
zlib level 1 is several times faster than Pillow's default 6 for a modest size increase).
Pure: Pillow and numpy, no torch.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 4


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    format: str
    width: int
    height: int

    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


def to_pil(pixels: np.ndarray) -> Image.Image:
    """An (H, W, 3) uint8 array as a PIL image, without copying where possible."""
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def encode(picture: Image.Image, fmt: str, quality: int) -> EncodedImage:
    """Encode `picture` as png, jpeg or webp (`quality` applies to jpeg and webp)."""
    buffer = io.BytesIO()
    if fmt == "png":
        picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        picture.save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        picture.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD)
    else:
        raise ValueError(f"unsupported output format {fmt!r}")
    return EncodedImage(buffer.getvalue(), fmt, picture.width, picture.height)
