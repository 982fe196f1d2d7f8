"""Checks on what the bake downloaded: whole safetensors files, a LoRA in the Lightning key form, a
complete pipeline folder, a safety checker the worker can load.

Why this exists: a bake must never leave a truncated or wrong file behind a manifest that vouches
for it; these checks are what bake.py runs before anything is moved into place.  Pure: no torch.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

LORA_KEY = re.compile(
    r"^(diffusion_model\.|transformer\.)?transformer_blocks\.\d+\.[\w.]+\.(lora_down\.weight|lora_up\.weight|alpha"
    r"|lora_A\.weight|lora_B\.weight)$"
)


class BakeError(Exception):
    """A bake that cannot go on: `code` is bake.py's exit code (see its docstring)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable or truncated, or None when its header and size agree."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024**2:
                return "header length is implausible"
            header = json.loads(handle.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError) as err:
        return f"unreadable header ({type(err).__name__})"
    size = path.stat().st_size
    if size != 8 + length + end:
        return f"size {size} does not match its header ({8 + length + end} bytes expected): truncated or damaged"
    return None


def lora_keys(path: Path) -> list[str]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return [k for k in json.loads(handle.read(length)) if k != "__metadata__"]


def verify_weights(folder: Path) -> None:
    """Raise BakeError(6) unless every safetensors file in `folder` is whole."""
    for path in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise BakeError(6, f"{path.relative_to(folder)}: {problem}")


def verify(folder: Path, lora: Path | None) -> None:
    """Raise BakeError(6) unless every weight file is whole, the LoRA (if kept) is a LoRA and the pipeline complete."""
    verify_weights(folder)
    if lora is not None:
        verify_lora(lora)
    index = json.loads((folder / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        part = folder / name
        if not part.is_dir() or not any(part.glob("*.json")):
            raise BakeError(6, f"model_index.json names {name!r} but {name}/ has no configuration")


def verify_lora(lora: Path) -> None:
    """Raise BakeError(6) unless `lora` is a whole transformer LoRA in the expected key form."""
    problem = safetensors_problem(lora)
    if problem:
        raise BakeError(6, f"{lora.name}: {problem}")
    keys = lora_keys(lora)
    bad = [k for k in keys if not LORA_KEY.match(k)]
    if not keys or bad or not any(k.endswith(("lora_down.weight", "lora_A.weight")) for k in keys):
        raise BakeError(6, f"{lora.name} is not a transformer LoRA in the expected key form "
                           f"(transformer_blocks.N.<module>.lora_down/lora_up/alpha); unexpected: {bad[:3]}")


def verify_safety_checker(folder: Path) -> None:
    """Raise BakeError(6) unless `folder` holds a whole image classifier with an `nsfw` label and its preprocessing."""
    verify_weights(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        labels = config["label2id"]
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        int(processor["size"]["height"]), int(processor["size"]["width"])
        if len(processor["image_mean"]) != 3 or len(processor["image_std"]) != 3:
            raise ValueError("image_mean and image_std need 3 values")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BakeError(6, f"the safety checker in {folder.name}/ is incomplete ({type(err).__name__}: {err})"
                        ) from None
    if "nsfw" not in labels or "ViTForImageClassification" not in config.get("architectures", []):
        raise BakeError(6, f"the safety checker in {folder.name}/ is not a ViT nsfw classifier (architectures "
                           f"{config.get('architectures')}, labels {sorted(labels)})")
