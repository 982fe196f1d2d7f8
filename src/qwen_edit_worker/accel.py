"""Attention backend and memory savers: the switches that really act on Qwen-Image.

Why this exists: two obvious calls are wrong for Qwen (facts.md section 4).
`enable_xformers_memory_efficient_attention()` replaces Qwen's joint attention processor and
breaks the model, so the backend is set through diffusers' attention dispatcher
(`transformer.set_attention_backend`).  `enable_attention_slicing()` silently does nothing,
because no Qwen component has `set_attention_slice`; the savers that act are the VAE's slicing
and tiling.  This module applies what works and reports exactly what took effect.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)
LARGE_GPU_BYTES = 48 * 1000**3  # MEMORY_SAVING=auto turns savers on below this


def xformers_problem(cuda: bool) -> str | None:
    """Why xformers cannot run here, or None when a real attention call on the GPU worked.

    Installed is not enough: an xformers wheel built for another torch imports with a warning
    and then has no kernels (0.0.35 was built for torch 2.10 + CUDA 12.8), so it is probed.
    """
    if not cuda:
        return "no CUDA device"
    if importlib.util.find_spec("xformers") is None:
        return "the xformers package is not installed"
    try:
        import torch
        import xformers.ops

        q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
        xformers.ops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as err:  # any failure of the probe means the backend is unusable here
        return f"its attention kernel failed on this GPU: {type(err).__name__}: {str(err)[:200]}"
    return None


def choose_attention_backend(setting: str, cuda: bool) -> str:
    """The dispatcher backend for ATTENTION_BACKEND; an explicit one that cannot work is an error."""
    if setting == "auto":
        problem = xformers_problem(cuda)
        choice = "native" if problem else "xformers"
        log.info("attention backend: %s (auto%s)", choice, f"; xformers unusable: {problem}" if problem else "")
        return choice
    if setting == "xformers":
        problem = xformers_problem(cuda)
        if problem:
            raise ModelLoadError("ATTENTION_BACKEND", f"xformers cannot run here ({problem}); use auto or native")
    if setting == "flash":
        flash_ok = importlib.util.find_spec("flash_attn") is not None
        if not (cuda and flash_ok):
            missing = "no CUDA device" if not cuda else "the flash-attn package is not installed"
            raise ModelLoadError("ATTENTION_BACKEND", f"flash cannot run here ({missing}); use auto or native")
    log.info("attention backend: %s", setting)
    return setting


def apply_attention_backend(transformer: Any, backend: str) -> None:
    """Route every attention module of the transformer through `backend`."""
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as err:
        raise ModelLoadError("ATTENTION_BACKEND", f"{backend} failed to start: {err}") from None


def check_offload(offload: str, cuda: bool) -> None:
    """OFFLOAD model and group move weights to a CUDA GPU: without one they are a load error."""
    if offload != "none" and not cuda:
        raise ModelLoadError("OFFLOAD", f"{offload} offload moves weights to a CUDA GPU and there is none; use none")


def place(pipe: Any, offload: str, cuda: bool) -> None:
    """Put the pipeline on its device: all of it (none), or under model or group offload.

    Offload keeps weights in CPU memory and moves them to the GPU as they are needed, so a GPU
    smaller than the model (57.7 GB in bf16) can run it, at the price of transfers every job.
    """
    check_offload(offload, cuda)
    if offload == "none":
        pipe.to("cuda" if cuda else "cpu")
        return
    import torch

    if offload == "model":
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)
    log.info("offload: %s (weights stay in CPU memory between uses)", offload)


def memory_saving_enabled(setting: str, gpu_total_bytes: int | None) -> bool:
    """MEMORY_SAVING: on/off as given; auto is on for a GPU under 48 GB, off otherwise (CPU too)."""
    if setting == "auto":
        return gpu_total_bytes is not None and gpu_total_bytes < LARGE_GPU_BYTES
    return setting == "on"


def apply_memory_saving(pipe: Any) -> list[str]:
    """Turn on every saver that acts on this pipeline; return the names of those that took effect."""
    applied: list[str] = []
    vae = pipe.vae
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        applied.append("vae_slicing")
    if hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
        applied.append("vae_tiling")
    sliceable = [name for name, part in pipe.components.items() if hasattr(part, "set_attention_slice")]
    for name in sliceable:
        pipe.components[name].set_attention_slice("auto")
        applied.append(f"attention_slicing:{name}")
    if not sliceable:
        log.info("attention slicing: no component of this pipeline supports it (on Qwen, diffusers' "
                 "enable_attention_slicing() is a no-op), so it is not applied; VAE slicing and tiling are")
    log.info("memory saving applied: %s", ", ".join(applied) or "nothing")
    return applied
