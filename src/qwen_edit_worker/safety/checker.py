"""The safety checker: one image classifier that screens every output picture before it is encoded.

Why this exists: an app that shows edits to the public needs every returned picture screened, and
the paid Qwen edit services do it (RunPod's public endpoints and fal take `enable_safety_checker`,
default true).  The model is `Falconsai/nsfw_image_detection`, a ViT-base/16 classifier (labels
normal / nsfw) run through transformers' ViTForImageClassification; docs/benchmarks.md has the
measurement that chose it over diffusers' CLIP-based StableDiffusionSafetyChecker (4.6x fewer FLOPs
and 3.5x fewer bytes, so the 24 GB class keeps its transformer on the GPU; accuracy is not measured
here: that needs the real weights).

The classifier and how it screens a batch are in classifier.py; this module finds the baked
checker and loads it (or the tiny twin, tiny.py, for SAFETY_CHECKER with TINY_MODEL=1).

The weights are baked at build time (builder/bake.py: `<variant>/safety_checker/`, pinned commit in
the manifest), in the slim image too, since RunPod's cached models hold one repo per endpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .classifier import FLAGGED_LABEL, Checker

log = logging.getLogger(__name__)
REPO = "Falconsai/nsfw_image_detection"
FOLDER = "safety_checker"  # inside the baked <variant>/ folder, beside lightning/


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
