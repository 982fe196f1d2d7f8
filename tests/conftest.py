"""Shared fixtures: tiny-model workers, test pictures, and environments.

Every model test runs the real diffusers pipelines on tiny random weights built in code
(qwen_edit_worker.model.tiny); nothing is mocked and nothing is downloaded.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qwen_edit_worker.serving.worker import Worker

VARIANTS = ("edit", "edit-2509", "edit-2511")


def tiny_env(**overrides: str) -> dict[str, str]:
    env = {"TINY_MODEL": "1", "WARMUP": "0", "MODEL_VARIANT": "edit-2511"}
    env.update(overrides)
    return env


def picture(width: int = 96, height: int = 64, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encode_picture(img: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def b64_picture(width: int = 96, height: int = 64, seed: int = 0, fmt: str = "PNG") -> str:
    return base64.b64encode(encode_picture(picture(width, height, seed), fmt)).decode()


def small_job(**fields: Any) -> dict[str, Any]:
    """A job that runs in a fraction of a second on the tiny model (64x64 working size)."""
    job_input = {"prompt": "make the sky a sunset", "image": b64_picture(), "width": 64, "height": 64, "seed": 7}
    job_input.update(fields)
    return {"id": "test-job", "input": {k: v for k, v in job_input.items() if v is not None}}


@pytest.fixture(scope="session")
def worker_for() -> Callable[..., Worker]:
    """A loaded tiny worker per variant (and per extra settings), shared across the session."""
    cache: dict[tuple[tuple[str, str], ...], Worker] = {}

    def get(variant: str = "edit-2511", **settings: str) -> Worker:
        env = tiny_env(MODEL_VARIANT=variant, **settings)
        key = tuple(sorted(env.items()))
        if key not in cache:
            cache[key] = Worker(env)
        return cache[key]

    return get


def decode_output_image(item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"]))).convert("RGB"))
