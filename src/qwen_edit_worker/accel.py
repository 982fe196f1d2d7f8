"""Placement and memory savers: the switches that really act on Qwen-Image's memory.

Why this exists: the obvious call is wrong for Qwen (facts.md section 4):
`enable_attention_slicing()` silently does nothing, because no Qwen component has
`set_attention_slice`; the savers that act are the VAE's slicing and tiling.  (Likewise
`enable_xformers_memory_efficient_attention()` breaks Qwen: attention.py sets backends through
diffusers' dispatcher instead.)  This module puts the pipeline on its devices as the placement
plan says and reports exactly what took effect.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)
LARGE_GPU_BYTES = 48 * 1000**3  # MEMORY_SAVING=auto turns savers on below this


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
