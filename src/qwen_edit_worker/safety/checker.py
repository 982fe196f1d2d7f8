"""The safety checker: one image classifier that screens every output picture before it is encoded.

Why this exists: an app that shows edits to the public needs every returned picture screened, and
the paid Qwen edit services do it (RunPod's public endpoints and fal take `enable_safety_checker`,
default true).  The model is `Falconsai/nsfw_image_detection`, a ViT-base/16 classifier (labels
normal / nsfw) run through transformers' ViTForImageClassification; docs/benchmarks.md has the
measurement that chose it over diffusers' CLIP-based StableDiffusionSafetyChecker (4.6x fewer FLOPs
and 3.5x fewer bytes, so the 24 GB class keeps its transformer on the GPU; accuracy is not measured
here: that needs the real weights).

The check runs on the job's pictures as one batch, on the device the model runs on: the uint8
pixels are resized to the classifier's input (bilinear with antialiasing, as its image processor's
PIL resize does) and normalised with the mean and std of its preprocessor_config.json, all as
tensors, so no picture is turned into a PIL image for it.  A picture whose `nsfw` probability is
above one half is flagged; `screen` replaces it with a black picture of the same size (as
diffusers' own safety checker does), so a flagged picture is never encoded, returned nor uploaded.

The weights are baked at build time (builder/bake.py: `<variant>/safety_checker/`, pinned commit in
the manifest), in the slim image too, since RunPod's cached models hold one repo per endpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError

log = logging.getLogger(__name__)
REPO = "Falconsai/nsfw_image_detection"
FOLDER = "safety_checker"  # inside the baked <variant>/ folder, beside lightning/
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


def locate(model_path: Path | None, baked_root: Path, variant: str, lightning_dir: Path | None = None) -> Path:
    """The baked checker's folder: beside the model, beside the slim image's LoRA, or in the baked layout."""
    candidates = [p / FOLDER for p in (model_path, None if lightning_dir is None else lightning_dir.parent,
                                       baked_root / variant) if p is not None]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise ModelLoadError("SAFETY_CHECKER", (
        f"no safety checker is baked (looked in {', '.join(str(c) for c in dict.fromkeys(candidates))}): build the "
        f"image with SAFETY_CHECKER request or always (the bake fetches {REPO}), or set SAFETY_CHECKER=off"))


def locate_for(mode: str, model_path: Path, baked_root: Path, variant: str,
               lightning_dir: Path | None = None) -> Path | None:
    """`locate` unless SAFETY_CHECKER is off (then None: nothing is loaded)."""
    return None if mode == "off" else locate(model_path, baked_root, variant, lightning_dir)


def load_for(mode: str, folder: Path | None, device: str, dtype: Any, tiny_flags: str | frozenset[int] = "none"
             ) -> Checker | None:
    """The checker SAFETY_CHECKER=`mode` asks for: None when off, the tiny one when no folder (TINY_MODEL=1)."""
    if mode == "off":
        return None
    if folder is None:
        from . import tiny

        return tiny.build(device, dtype, tiny_flags)
    return load(folder, device, dtype)


def load(folder: Path, device: str, dtype: Any) -> Checker:
    """The checker baked in `folder`, on `device`; ModelLoadError naming SAFETY_CHECKER when it cannot load."""
    from transformers import ViTForImageClassification

    try:
        model = ViTForImageClassification.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        size = (int(processor["size"]["height"]), int(processor["size"]["width"]))
        mean, std = tuple(processor["image_mean"]), tuple(processor["image_std"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ModelLoadError("SAFETY_CHECKER", f"cannot load the safety checker from {folder}: {err}") from None
    if FLAGGED_LABEL not in model.config.label2id:
        raise ModelLoadError("SAFETY_CHECKER", f"{folder} is not an nsfw classifier: its labels are "
                                               f"{sorted(model.config.label2id)}, with no {FLAGGED_LABEL!r}")
    model.to(device).eval()
    checker = Checker(model, size, mean, std, device, dtype, _source(folder))  # type: ignore[arg-type]
    log.info("safety checker %s loaded on %s (%.0f MB)", checker.source, device, checker.resident_bytes() / 1e6)
    return checker


def _source(folder: Path) -> str:
    """"REPO@commit" from the bake's manifest beside the folder, else the folder."""
    try:
        entry = json.loads((folder.parent / "manifest.json").read_text())["safety_checker"]
        return f"{entry['repo']}@{entry['commit'][:12]}"
    except (OSError, ValueError, KeyError, TypeError):
        return str(folder)
