"""Placement and memory savers: the switches that really act on Qwen-Image's memory.

Why this exists: the obvious call is wrong for Qwen (facts.md section 4):
`enable_attention_slicing()` silently does nothing, because no Qwen component has
`set_attention_slice`; the savers that act are the VAE's slicing and tiling.  (Likewise
`enable_xformers_memory_efficient_attention()` breaks Qwen: model/attention.py sets backends through
diffusers' dispatcher instead.)  This module puts the pipeline on its devices as the placement
plan says and reports exactly what took effect.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ModelLoadError

log = logging.getLogger(__name__)
LARGE_GPU_BYTES = 48 * 1000**3  # MEMORY_SAVING=auto turns savers on below this


def check_offload(offload: str, cuda: bool) -> None:
    """OFFLOAD text_encoder, model and group move weights to a CUDA GPU: without one, a load error."""
    if offload != "none" and not cuda:
        raise ModelLoadError("OFFLOAD", f"{offload} offload moves weights to a CUDA GPU and there is none; "
                                        "use auto or none")


def place_text_stage(pipe: Any, offload: str, cuda: bool) -> None:
    """The text encoder and VAE where placement `offload` runs them (`none` or `text_encoder`), before the
    transformer is in, so a prompt can be encoded meanwhile; `place` then leaves them as they are."""
    if offload not in ("none", "text_encoder"):
        raise ValueError(f"the text stage is placed early only for none and text_encoder, not {offload}")
    device = "cuda" if cuda else "cpu"
    pipe.vae.to(device)
    if offload == "none":
        pipe.text_encoder.to(device)
        return
    import torch

    check_offload(offload, cuda)
    stream_text_encoder(pipe, torch.device("cuda"), use_stream=True)


def place(pipe: Any, offload: str, cuda: bool, text_placed: bool = False) -> None:
    """Put the pipeline on its devices as placement `offload` says (placement/planner.py explains each).

    Offload keeps weights in CPU memory and moves them to the GPU as they are needed, so a GPU
    smaller than the model (57.7 GB in bf16) can run it, at the price of transfers every job.
    `text_placed`: place_text_stage already put the text encoder and VAE (offload none or text_encoder).
    """
    check_offload(offload, cuda)
    if offload == "none":
        pipe.to("cuda" if cuda else "cpu")
        return
    import torch

    if offload == "text_encoder":
        pipe.transformer.to("cuda")
        pipe.vae.to("cuda")
        if not text_placed:
            stream_text_encoder(pipe, torch.device("cuda"), use_stream=True)
    elif offload == "model":
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)
    log.info("offload: %s (those weights stay in CPU memory between uses)", offload)


def stream_text_encoder(pipe: Any, onload_device: Any, use_stream: bool) -> None:
    """Keep the text encoder in CPU memory and stream its layers to `onload_device` when it runs.

    Leaf-level group offload with prefetch on a side CUDA stream (`use_stream`): the copy of the
    next layer overlaps the current one's compute, and only a few layers are on the GPU at a time.
    The pipeline then reports the onload device as its execution device (diffusers looks for
    group-offload hooks first), so prompts and latents are created on the GPU.
    """
    import torch
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(pipe.text_encoder, onload_device=onload_device, offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=use_stream)


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
