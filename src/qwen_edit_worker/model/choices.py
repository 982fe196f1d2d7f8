"""What a load will do, decided before any weight is read.

Why this exists: a load reads 30 to 58 GB, so every decision that can fail (a missing folder, a
precision this GPU cannot run, a setting that contradicts the bake, a placement that does not fit)
is taken first, from the settings, the GPU's properties and the safetensors headers alone, and a
wrong one fails as a ModelLoadError naming the setting before a byte of weights moves.  The
answer, a LoadPlan, also says which path the weights take (straight onto the device, the text
encoder first, the transformer block by block), so model/sequence.py only carries it out.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import placement, safety
from ..errors import ModelLoadError
from ..settings import Settings
from ..weights import int8_mm, precision, prepare
from . import accel, attention, sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadPlan:
    """The decisions of one load, and the facts they came from."""

    settings: Settings  # PRECISION=auto made concrete for this GPU and bake
    device: str  # "cuda" or "cpu": where the model runs
    dtype: Any  # the torch dtype it runs in
    attention: attention.AttentionChoice
    source: sources.ModelSource | None  # None: the tiny model, built in code
    gpu_bytes: int | None  # the GPU's total memory; None without one
    checker_folder: Path | None  # the baked safety checker; None: off, or the tiny model's own
    plan: placement.Plan | None  # None: the tiny model (planned from its bytes once built)
    straight: bool  # every component fits the GPU as stored: read straight onto it, no CPU copy
    encoder_first: bool  # the text encoder is read on its own and quantised on the device before the rest
    by_block: bool  # the transformer is read, fused and quantised block by block (a bf16 bake quantised at load)
    transformer_fits: bool  # the transformer alone fits the GPU as stored (else its fuse runs on the CPU)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def resident(self) -> bool:
        """Whether the transformer stays on the GPU (placements none and text_encoder; always without a plan)."""
        return self.plan is None or self.plan.offload in ("none", "text_encoder")

    @property
    def home(self) -> str:
        """Where the transformer's blocks are left as they are made."""
        return self.device if self.resident else "cpu"

    @property
    def device_map(self) -> str | None:
        """Where `from_pretrained` puts what it reads: the device when everything fits as stored (and without a
        GPU), else the host (None), from where each part goes where the plan says."""
        return self.device if self.straight or not self.cuda else None

    @property
    def early_text(self) -> bool:
        """Whether prompts can be encoded before the transformer is in: the text encoder then already sits where
        it runs (no GPU, everything resident, or the text encoder streamed).  Not with model or group offload,
        whose hooks are laid over the whole pipeline at once."""
        return self.plan is None or not self.cuda or self.plan.offload in ("none", "text_encoder")


def decide(settings: Settings) -> LoadPlan:
    """The LoadPlan for `settings` on this machine; ModelLoadError naming what is wrong."""
    import torch

    cuda = torch.cuda.is_available()
    # Timed before the weights arrive: a few q/k/v tensors, a fraction of a second per backend.
    measure = attention.measurer(attention.sequence_length(settings.variant)) if cuda else None
    chosen = attention.choose(settings.attention_backend, cuda, measure)

    source = None if settings.tiny_model else sources.locate(settings.model_path, settings.variant)
    if source is not None:
        log.info("model source: %s %s%s", source.kind, source.path,
                 f" ({source.model}; LoRA {source.lora or 'from LORA_PATH'})" if source.model else "")
        check_folder(source.path)
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", cpu_dtype(source))
    if settings.offload not in ("auto", "none"):
        accel.check_offload(settings.offload, cuda)  # fail before reading 58 GB of weights
    capability = torch.cuda.get_device_capability(0) if cuda else None
    settings = resolve_precision(settings, source, cuda, capability)
    check_precisions(settings, source, cuda, capability)
    int8_mm.install()  # int8 layers, quantised here or in the bake, never read back to the host (weights/int8_mm.py)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    # Fails now when SAFETY_CHECKER needs a baked checker and there is none; None: off, or the tiny model's own.
    checker_folder = None if source is None else safety.locate_for(
        settings.safety_checker, source.path, sources.BAKED_ROOT, settings.variant.name, source.lightning_dir)
    if source is None:
        return LoadPlan(settings, device, dtype, chosen, None, gpu_bytes, None, None, False, False, False,
                        _component_fits(None, "transformer", gpu_bytes))
    # Decided from the safetensors headers before any weight is read.
    plan = plan_for(settings, source.path, gpu_bytes, checker_folder)
    stored = placement.model_bytes(source.path, "bf16", "bf16", held=False)  # every weight as read, in bf16
    straight = plan.offload == "none" and _stored_fits(stored, gpu_bytes)
    # A bf16 bake with TEXT_ENCODER_PRECISION int8|fp8: the encoder is read onto the device and quantised there
    # first, while the GPU is still empty (model/text_encoder.py); on a GPU smaller than the bf16 encoder (the
    # 16 GB class) it is loaded on the host and quantised layer by layer on the device instead.
    encoder_first = not straight and encoder_goes_first(settings, source, stored, gpu_bytes)
    by_block = not straight and settings.precision != baked(source)[0]
    return LoadPlan(settings, device, dtype, chosen, source, gpu_bytes, checker_folder, plan, straight,
                    encoder_first, by_block, _component_fits(stored, "transformer", gpu_bytes))


def cpu_dtype(source: sources.ModelSource | None) -> Any:
    """The dtype a CPU runs in: the folder's own (its VAE's, never quantised), so a bf16 bake is read as it is
    stored, with no float32 copy made on the way (a second pass over every byte, twice the memory); the tiny
    model, built in code, in float32."""
    import torch

    if source is None:
        return torch.float32
    try:
        return prepare.stored_dtype(source.path / "vae")
    except prepare.PrepareError:
        raise ModelLoadError("MODEL_PATH", f"{source.path / 'vae'} has no floating-point safetensors weights; "
                                           "bake the model into the image or point MODEL_PATH at it") from None


def check_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        reason = "does not exist" if not path.exists() else "has no model_index.json (not a diffusers pipeline folder)"
        raise ModelLoadError("MODEL_PATH", f"{path} {reason}; bake the model into the image or point MODEL_PATH at it")


def plan_for(settings: Settings, path: Path, gpu_bytes: int | None, checker: Path | None) -> placement.Plan:
    """The placement for the folder's components at the precisions they will run in; logged with its numbers."""
    sizes = placement.model_bytes(path, settings.precision, settings.text_encoder_precision, checker)
    plan = placement.plan(sizes, gpu_bytes, settings.offload, **plan_options(settings, gpu_bytes))
    log.info("placement: offload=%s (%s); component GB: %s", plan.offload, plan.reason,
             ", ".join(f"{k}={v / placement.GB:.1f}" for k, v in sizes.items()))
    if not plan.fits and settings.offload == "auto":
        raise ModelLoadError("OFFLOAD", plan.reason)
    if not plan.fits:
        log.warning("placement: OFFLOAD=%s does not fit this GPU: %s", settings.offload, plan.reason)
    return plan


def plan_options(settings: Settings, gpu_bytes: int | None) -> dict[str, Any]:
    """What the plan needs to know beyond sizes: the precisions, VAE tiling, the pipeline's kind."""
    return {"precision": settings.precision, "text_encoder_precision": settings.text_encoder_precision,
            "zero_cond_t": settings.variant.zero_cond_t,
            "vae_tiled": accel.memory_saving_enabled(settings.memory_saving, gpu_bytes),
            "edit_plus": settings.variant.pipeline_class != "QwenImageEditPipeline"}


def _stored_fits(stored: dict[str, int], gpu_bytes: int | None) -> bool:
    """Whether every component fits the GPU as stored (before any quantisation at load), job room included."""
    return gpu_bytes is not None and placement.need("none", stored)[0] <= gpu_bytes


def encoder_goes_first(settings: Settings, source: sources.ModelSource, stored: dict[str, int] | None,
                       gpu_bytes: int | None) -> bool:
    """Whether the text encoder is read on its own and quantised on the device before the transformer.

    Only when it is quantised at load (a bf16 bake, TEXT_ENCODER_PRECISION int8|fp8) and its bf16 weights fit
    the GPU alone (no GPU: the same path on the CPU).
    """
    if settings.text_encoder_precision == baked(source)[1]:
        return False
    return gpu_bytes is None or _component_fits(stored, "text_encoder", gpu_bytes)


def _component_fits(stored: dict[str, int] | None, component: str, gpu_bytes: int | None) -> bool:
    """Whether `component` alone fits the GPU as stored (bf16), with the CUDA reserve; never without a GPU."""
    if gpu_bytes is None:
        return False
    return stored is None or stored[component] + placement.RESERVE_BYTES <= gpu_bytes


def resolve_precision(settings: Settings, source: sources.ModelSource | None, cuda: bool,
                      capability: tuple[int, int] | None) -> Settings:
    """PRECISION=auto made concrete for this GPU (and bake); the loaded model reports the value chosen."""
    if settings.precision != "auto":
        return settings
    chosen = precision.resolve("auto", cuda, capability, baked(source)[0])
    log.info("PRECISION=auto: %s (compute capability %s%s)", chosen,
             "none" if capability is None else f"{capability[0]}.{capability[1]}",
             "; as baked" if baked(source)[0] != "bf16" else "")
    return dataclasses.replace(settings, precision=chosen)


def check_precisions(settings: Settings, source: sources.ModelSource | None, cuda: bool,
                     capability: tuple[int, int] | None) -> None:
    """Before any weight is read: precisions this machine cannot run, settings that contradict the bake."""
    stored = baked(source)  # an fp8 bake on a CPU or an older GPU: the message says no setting can help
    precision.check(settings.precision, "PRECISION", cuda, capability, stored[0])
    precision.check(settings.text_encoder_precision, "TEXT_ENCODER_PRECISION", cuda, capability, stored[1])
    if source is not None:
        source.check_settings(settings.lightning, settings.lora_path, settings.precision,
                              settings.text_encoder_precision)


def baked(source: sources.ModelSource | None) -> tuple[str, str]:
    """(transformer, text encoder) precision as stored; the tiny model is built in bf16's place."""
    return ("bf16", "bf16") if source is None else (source.transformer_precision, source.text_encoder_precision)


def lora_path(settings: Settings, source: sources.ModelSource | None) -> tuple[Path, str]:
    """The Lightning LoRA file and the setting that names it (for error messages)."""
    if settings.lora_path is not None:
        return settings.lora_path, "LORA_PATH"
    if source is None:
        from . import tiny

        return tiny.default_lora_file(settings.variant), "TINY_MODEL"
    return source.default_lora(settings.variant), "LORA_PATH"
