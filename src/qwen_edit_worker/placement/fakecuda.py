"""The real components on fake tensors on a fake CUDA device: full-size runs with no GPU and no weights.

Why this exists: every memory and FLOP figure the planner states about the real model must be
checked, and no GPU is lent to check them.  Under torch's `FakeTensorMode` tensors have shapes,
dtypes and devices but no data, and a `cuda` device works on a CPU machine, so the real
transformer (20.4 B), text encoder (Qwen2.5-VL-7B, vision tower included) and VAE build from their
real configs (placement/realconfig.py) in seconds and run a job's phases at full size
(facts.md section 11).  What runs is what a GPU would run, as far as a CPU can tell:
- attention: SDPA on a fake device cannot choose a kernel and would fall back to the math path
  (the whole attention matrix), so `fake_cuda()` sends it to the flash kernel's aten op (the
  memory-efficient one where a mask is given), as a GPU would;
- quantisation through the project's own weights/precision.py (torchao's CUDA int8 and fp8
  paths); torchao asks the GPU's compute capability, answered as sm90 while quantising inside `fake_cuda()` only.
`layers` builds the same widths with fewer blocks: blocks run one after another and free their
intermediates, so 2 layers give the same per-layer peak as 60 (tests/test_measure.py pins it).

Use: `with fake_cuda(): model = transformer(zero_cond_t, "int8", layers=2); ...`; everything built
or run must stay inside the same `fake_cuda()` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import torch

from . import realconfig

CAPABILITY = (9, 0)  # the answer to torchao's hardware question inside the fake run (Hopper)
_ACTIVE: list[Any] = []  # the FakeTensorMode of the enclosing fake_cuda(), if any


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """SDPA as a GPU runs it: the flash kernel, or the memory-efficient one when a mask is given."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    bias = None
    if attn_mask is not None:
        bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, dtype=query.dtype, device=query.device)
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, False, dropout_p, is_causal, scale=scale)[0]


@contextmanager
def fake_cuda() -> Iterator[Any]:
    """Fake tensors, `cuda` as the default device, GPU attention kernels and an sm90 answer for torchao.

    Yields the FakeTensorMode.  Real CPU tensors passed in (a processor's output) become fake ones.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    _import_models()  # imports read the real machine: never inside the patched, fake world
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _attention))
        stack.enter_context(mode)
        stack.enter_context(torch.device("cuda"))
        _ACTIVE.append(mode)
        try:
            yield mode
        finally:
            _ACTIVE.pop()


def _import_models() -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel  # noqa: F401
    from torchao.quantization import quantize_  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401


@contextmanager
def _dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def _hopper() -> Iterator[None]:
    """torchao's hardware question (is_available, get_device_capability) answered as sm90, while quantising.

    Only around the quantisation call: a CUDA that says it is available makes torch's random
    initialisation reach for the real driver.
    """
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: CAPABILITY):
        yield


def _require_fake() -> None:
    if not _ACTIVE:
        raise RuntimeError("build the fake components inside `with fake_cuda():`")


def transformer(zero_cond_t: bool, precision: str = "bf16", layers: int | None = None) -> Any:
    """The real QwenImageTransformer2DModel (bf16, or quantised by weights/precision.py) on fake CUDA."""
    from diffusers import QwenImageTransformer2DModel

    from ..weights import precision as precisions

    _require_fake()
    with _dtype(torch.bfloat16):
        model = QwenImageTransformer2DModel(**realconfig.transformer_config(zero_cond_t, layers)).eval()
    if precision != "bf16":
        with _hopper():
            precisions.quantise_transformer(model, precision)
    return model


def text_encoder(precision: str = "bf16", layers: int | None = None) -> Any:
    """The real Qwen2.5-VL-7B encoder (vision tower in bf16; the rest quantised as precision.py does)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..weights import precision as precisions

    _require_fake()
    with _dtype(torch.bfloat16):
        model = Qwen2_5_VLForConditionalGeneration(realconfig.text_encoder_config(layers)).eval()
    if precision != "bf16":
        with _hopper():
            precisions.quantise_text_encoder(model, precision)
    return model


def vae(tiled: bool = False) -> Any:
    """The real AutoencoderKLQwenImage in bf16 on fake CUDA; `tiled`: slicing and tiling on (MEMORY_SAVING)."""
    from diffusers import AutoencoderKLQwenImage

    _require_fake()
    with _dtype(torch.bfloat16):
        model = AutoencoderKLQwenImage(**realconfig.VAE_CONFIG).eval()
    if tiled:
        model.enable_slicing()
        model.enable_tiling()
    return model
