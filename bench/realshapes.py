"""Real-shaped Qwen-Image-Edit components with random weights, made directly on the device.

Why this exists: no hub is reachable from the GPU machine, and the real transformer is 41 GB in
bf16, so the benchmarks build the real configs (transformer 20.4 B, Qwen2.5-VL-7B text encoder
8.3 B, VAE 127 M) with random weights, created on the GPU in bf16 inside a `torch.device` context
(no CPU copy, no float32 detour).  Random weights give the real model's arithmetic and memory,
never its pictures.  bench/gpu and bench/gpu-session share these builders; the builders are
seeded, so a transformer rebuilt with the same seed holds the same weights (deviation checks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qwen_edit_worker.model import tiny
from qwen_edit_worker.placement import realconfig
from qwen_edit_worker.weights import lightning

TEXT_CONFIG = realconfig.TEXT_CONFIG  # one source of truth: src/qwen_edit_worker/placement/realconfig.py
VISION_CONFIG = realconfig.VISION_CONFIG


@contextmanager
def on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on `device` in `dtype` (random init runs there)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def text_encoder_config(tokenizer: Any, layers: int | None = None, vision_layers: int | None = None) -> Any:
    """The real Qwen2.5-VL-7B config (or the same widths with `layers` text and vision layers; `vision_layers`
    gives the vision tower its own depth)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    return realconfig.text_encoder_config(layers, ids, vision_layers)


def transformer(device: str, dtype: torch.dtype, zero_cond_t: bool = True, seed: int | None = None) -> Any:
    """The real QwenImageTransformer2DModel with random weights (the same weights for the same seed)."""
    from diffusers import QwenImageTransformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    with on(device, dtype):
        return QwenImageTransformer2DModel(**realconfig.transformer_config(zero_cond_t)).eval()


def components(device: str, dtype: torch.dtype, zero_cond_t: bool = True, seed: int | None = None,
               text_layers: int | None = None) -> dict[str, Any]:
    """Every real-config component with random weights; the transformer first, so a seed fixes it alone."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = tiny.build_tokenizer()  # byte-level: its ids fit in the real vocabulary
    parts = {"transformer": transformer(device, dtype, zero_cond_t, seed)}
    with on(device, dtype):
        parts["vae"] = AutoencoderKLQwenImage(**realconfig.VAE_CONFIG).eval()
        parts["text_encoder"] = Qwen2_5_VLForConditionalGeneration(text_encoder_config(tokenizer, text_layers)).eval()
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    return {**parts, "tokenizer": tokenizer, "processor": processor,
            "scheduler": lightning.lightning_scheduler(tiny.base_scheduler())}


def write_lora(path: Path, model: Any, rank: int = 16, seed: int = 1, alpha: float | None = None) -> Path:
    """A Lightning-shaped LoRA for `model` (any size) in LightX2V's key layout, small random values
    (`alpha` defaults to the rank; the real Lightning files are believed to be rank 64, alpha 8: facts.md 11)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.startswith("transformer_blocks.") and name.endswith(tiny.LORA_MODULES):
            state[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            state[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
            state[f"{name}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    return path


def safety_checker(device: str, dtype: torch.dtype) -> Any:
    """The safety checker at its real shape (Falconsai/nsfw_image_detection's config: ViT-base/16 at 224 px),
    random weights, its classifier biased to flag nothing (as the tiny one), so a job pays the real check's cost."""
    from transformers import ViTConfig, ViTForImageClassification

    from qwen_edit_worker.safety import Checker
    from qwen_edit_worker.safety import tiny as safety_tiny

    config = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16, id2label={0: "normal", 1: "nsfw"},
                       label2id={"normal": 0, "nsfw": 1})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([safety_tiny.QUIET_BIAS, -safety_tiny.QUIET_BIAS]))
    model.to(device=device, dtype=dtype)
    return Checker(model, (224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), device, dtype, "real shape, random weights")
