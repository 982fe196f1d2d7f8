"""The classifier that screens output pictures, and how its input is made: one batch, on its device.

Why this exists: the check runs on the job's pictures as one batch, on the device the model runs on:
the uint8 pixels are resized to the classifier's input (bilinear with antialiasing, as its image
processor's PIL resize does) and normalised with the mean and std of its preprocessor_config.json,
all as tensors, so no picture is turned into a PIL image for it.  A picture whose `nsfw` probability
is above one half is flagged; `screen` replaces it with a black picture of the same size (as
diffusers' own safety checker does), so a flagged picture is never encoded, returned nor uploaded.
The baked checker (checker.py) and its tiny twin (tiny.py) both make one of these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FLAGGED_LABEL = "nsfw"
THRESHOLD = 0.5  # the nsfw probability above which a picture is flagged (argmax of the two labels)


@dataclass
class Checker:
    """A loaded classifier and how to feed it."""

    model: Any  # transformers' ViTForImageClassification (or a model with the same call and config)
    size: tuple[int, int]  # (height, width) of the model's input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str
    dtype: Any
    source: str  # "REPO@commit", "tiny", or the folder it came from

    @property
    def flagged_index(self) -> int:
        return int(self.model.config.label2id[FLAGGED_LABEL])

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))

    def check(self, pixels: np.ndarray) -> list[bool]:
        """One verdict per picture of the (N, H, W, 3) uint8 batch: True when flagged."""
        import torch

        batch = to_model_input(pixels, self.size, self.mean, self.std, self.dtype, self.device)
        with torch.inference_mode():
            logits = self.model(pixel_values=batch).logits
        probability = logits.float().softmax(dim=-1)[:, self.flagged_index]
        return [bool(p > THRESHOLD) for p in probability.cpu()]

    def screen(self, pixels: np.ndarray) -> tuple[list[bool], np.ndarray]:
        """(verdicts, the batch with every flagged picture black), before anything encodes a picture."""
        flags = self.check(pixels)
        if any(flags):
            pixels = pixels if pixels.flags.writeable else pixels.copy()
            pixels[np.asarray(flags)] = 0
        return flags, pixels

    def info(self) -> dict[str, Any]:
        """The job output's `model.safety_checker` block."""
        return {"model": self.source, "device": self.device, "input": list(self.size), "threshold": THRESHOLD}


def to_model_input(pixels: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                   dtype: Any, device: str) -> Any:
    """(N, H, W, 3) uint8 pixels -> (N, 3, h, w) normalised model input, resized on `device` in one batch."""
    import torch
    import torch.nn.functional as functional

    array = np.ascontiguousarray(pixels)
    array = array if array.flags.writeable else array.copy()  # torch warns about read-only arrays
    batch = torch.from_numpy(array).to(device).permute(0, 3, 1, 2)
    if batch.device.type != "cpu":
        batch = batch.float()  # on the GPU, float in and out; on the CPU, the resize has a fast uint8 path (~18x)
    batch = functional.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False).float()
    shape = (1, 3, 1, 1)
    batch = (batch / 255.0 - torch.tensor(mean, device=device).view(shape)) / torch.tensor(std, device=device).view(
        shape)
    return batch.to(dtype)
