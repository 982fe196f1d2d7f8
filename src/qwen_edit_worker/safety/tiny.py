"""A tiny random-weight safety checker of the real class, built in code, whose verdicts a test can set.

Why this exists: tests and `make demo` (TINY_MODEL=1) must run the check for real (the same
ViTForImageClassification, the same batched preprocessing, its time counted) without weights.
Its classifier is biased so that it flags nothing on its own, so every pixel comparison of the
tiny model keeps its pictures.  TINY_SAFETY_FLAGS (a test aid, read only with TINY_MODEL=1) makes
it flag `all` pictures, or those at the given batch indexes (`0,2`): a forward hook overrides the
logits of those pictures, after the model has run on them; the decision that follows is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from .classifier import Checker

HIDDEN = 16
IMAGE_SIZE = 224  # the real model's input, so the resize is the real one
TINY_SEED = 0
QUIET_BIAS = 30.0  # a normal-over-nsfw margin no random activation of this size overturns


def parse_flags(value: str) -> str | frozenset[int]:
    """TINY_SAFETY_FLAGS: "" or none, all, or comma-separated batch indexes."""
    text = value.strip().lower()
    if text in ("", "none"):
        return "none"
    if text == "all":
        return "all"
    try:
        indexes = frozenset(int(part) for part in text.split(","))
    except ValueError:
        indexes = frozenset({-1})
    if min(indexes) < 0:
        raise SettingsError("TINY_SAFETY_FLAGS", f"must be none, all, or batch indexes such as 0,2 (got {value!r})")
    return indexes


def build(device: str, dtype: Any, flags: str | frozenset[int] = "none") -> Checker:
    """The tiny checker on `device`, flagging what `flags` says (default: nothing)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(TINY_SEED)
    config = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=HIDDEN,
                       image_size=IMAGE_SIZE, patch_size=16, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([QUIET_BIAS, -QUIET_BIAS]))
    if flags != "none":
        model.classifier.register_forward_hook(_forced(flags))
    model.to(device=device, dtype=dtype)
    return Checker(model, (IMAGE_SIZE, IMAGE_SIZE), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), device, dtype, "tiny")


def _forced(flags: str | frozenset[int]) -> Any:
    def hook(module: Any, inputs: Any, logits: Any) -> Any:
        chosen = range(logits.shape[0]) if flags == "all" else [i for i in flags if i < logits.shape[0]]
        logits = logits.clone()
        for index in chosen:
            logits[index, 0], logits[index, 1] = -QUIET_BIAS, QUIET_BIAS
        return logits

    return hook


def save(folder: Path) -> Path:
    """The tiny checker written as the bake lays the real one out (config.json, model.safetensors,
    preprocessor_config.json), for tests that load a model folder the way a baked image does."""
    import torch

    checker = build("cpu", torch.float32)
    checker.model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
         "image_mean": list(checker.mean), "image_std": list(checker.std)}))
    return folder
