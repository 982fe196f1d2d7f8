"""Loading the model: from the baked folder (or the tiny one built in code) to a ready pipeline.

Why this exists: loading is where a deployment goes wrong (a missing folder, a LoRA that does
not fit, a backend that cannot run), so every step here fails with a ModelLoadError that names
the setting or file at fault, and the result records exactly what took effect (device, dtype,
attention backend, memory savers, LoRA layers) for the log and each job's `model` block.
Loading never reaches the network: HF_HUB_OFFLINE is set and only local files are read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import placement, safety
from ..errors import ModelLoadError
from ..settings import Settings
from ..weights import int8_mm, lightning, lightning_file, precision
from . import accel, attention, sources, speedups

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A ready pipeline and the facts about it that jobs report."""

    pipe: Any
    settings: Settings
    device: str
    dtype: str
    gpu_name: str | None
    attention: attention.AttentionChoice
    memory_saving: list[str]
    source: str
    lora_layers: int
    # Benchmarks that build a LoadedModel by hand get the CPU plan; load_model always passes the real one.
    placement: placement.Plan = field(default_factory=lambda: placement.plan({}, None))
    manifest: dict[str, str] | None = None
    lightning_fused: str | None = None  # where the Lightning LoRA was fused: "bake", "load", or None (base model)
    quantised: dict[str, Any] = field(default_factory=dict)  # component -> where and how long, when done at load
    load_seconds: float = 0.0
    safety: safety.Checker | None = None  # SAFETY_CHECKER off: None

    def info(self, steps: int) -> dict[str, Any]:
        """The job output's `model` block."""
        return {
            "variant": self.settings.variant.name,
            "lightning": self.settings.lightning,
            "steps": steps,
            "attention_backend": self.attention.backend,
            "attention_choice": self.attention.how,
            "attention_ms": dict(self.attention.timings_ms),
            "memory_saving": list(self.memory_saving),
            "offload": self.placement.offload,
            "placement": self.placement.info(),
            "precision": self.settings.precision,
            "text_encoder_precision": self.settings.text_encoder_precision,
            "lightning_fused": self.lightning_fused,
            "quantised_at_load": dict(self.quantised),
            "compile": self.settings.compile,
            "dtype": self.dtype,
            "device": self.device,
            "source": self.source,
            "manifest": self.manifest,
            "safety_checker": None if self.safety is None else self.safety.info(),
        }


def load_model(settings: Settings) -> LoadedModel:
    """Build the pipeline `settings` describe; raise ModelLoadError naming what is wrong."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    # Timed before the weights arrive: a few q/k/v tensors, a fraction of a second per backend.
    measure = attention.measurer(attention.sequence_length(settings.variant)) if cuda else None
    chosen = attention.choose(settings.attention_backend, cuda, measure)

    source = None if settings.tiny_model else sources.locate(settings.model_path, settings.variant)
    if source is not None:
        log.info("model source: %s %s%s", source.kind, source.path,
                 f" ({source.model}; LoRA {source.lora or 'from LORA_PATH'})" if source.model else "")
        _check_folder(source.path)
    if settings.offload not in ("auto", "none"):
        accel.check_offload(settings.offload, cuda)  # fail before reading 58 GB of weights
    capability = torch.cuda.get_device_capability(0) if cuda else None
    settings = _resolve_precision(settings, source, cuda, capability)
    _check_precisions(settings, source, cuda, capability)
    int8_mm.install()  # int8 layers, quantised here or in the bake, never read back to the host (weights/int8_mm.py)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    # Fails now when SAFETY_CHECKER needs a baked checker and there is none; None: off, or the tiny model's own.
    checker_folder = None if source is None else safety.locate_for(
        settings.safety_checker, source.path, sources.BAKED_ROOT, settings.variant.name, source.lightning_dir)
    # Decided from the safetensors headers before any weight is read (the tiny model: after building).
    plan = None if source is None else _plan(settings, source.path, gpu_bytes, checker_folder)
    stored = None if source is None else placement.model_bytes(source.path, "bf16", "bf16")  # as on disk, in bf16
    straight = plan is not None and plan.offload == "none" and _stored_fits(stored, gpu_bytes)
    resident = plan is None or plan.offload in ("none", "text_encoder")
    # A bf16 bake with TEXT_ENCODER_PRECISION int8|fp8: the encoder is read onto the device and quantised there
    # first, while the GPU is still empty (model/text_encoder.py); on a GPU smaller than the bf16 encoder (the
    # 16 GB class) it is loaded on the host and quantised layer by layer on the device instead (below).
    encoder = None if source is None or straight or not _encoder_first(settings, source, stored, gpu_bytes) else (
        _text_encoder_early(source, settings.text_encoder_precision, dtype, device, plan))
    # A bf16 bake quantised at load: the transformer is read, fused and quantised block by block (model/by_block.py).
    early = None if source is None or straight or settings.precision == _baked(source)[0] else (
        _transformer_by_block(settings, source, dtype, device, device if resident else "cpu"))
    # When everything fits as stored, weights are read straight onto the device (no CPU copy).
    pipe = _build_pipeline(settings, source, dtype, device if straight or not cuda else None,
                           None if early is None else early[0], None if encoder is None else encoder[0])
    checker = safety.load_for(settings.safety_checker, checker_folder, device, dtype, settings.tiny_safety_flags)
    if plan is None:
        plan = placement.plan(_resident_bytes(pipe, checker), gpu_bytes, settings.offload,
                              **_plan_options(settings, gpu_bytes))
        resident = plan.offload in ("none", "text_encoder")
    if early is None and cuda and not straight and _transformer_fits(stored, gpu_bytes):
        pipe.transformer.to(device)  # fuse and quantise on the GPU; the placement below takes it from there
    if early is None:
        lora_layers, fused_at = _apply_lightning(pipe, settings, source)
        # After the fuse (never a bf16 LoRA over quantised weights); block by block onto where the plan keeps it.
        quantised = _quantise_transformer(pipe, settings, source, device, device if resident else "cpu")
    else:
        pipe.scheduler = lightning.lightning_scheduler(pipe.scheduler) if settings.lightning else pipe.scheduler
        lora_layers, quantised = early[1]["lora_layers"], {"transformer": early[1]}
        fused_at = None if not settings.lightning else "bake" if source is not None and source.fused_lora else "load"
    attention.apply(pipe.transformer, chosen.backend)
    if settings.compile == "regional":
        speedups.compile_regional(pipe.transformer)
    if resident:
        pipe.transformer.to(device)  # the layers that were not quantised (norms, embeddings) follow
    else:
        pipe.transformer.to("cpu")
    quantised.update(_quantise_text_encoder(pipe, settings, source, device) if encoder is None
                     else {"text_encoder": encoder[1]})
    accel.place(pipe, plan.offload, cuda)

    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    saving = accel.apply_memory_saving(pipe) if accel.memory_saving_enabled(settings.memory_saving, gpu_bytes) else []
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(
        pipe=pipe, settings=settings, device=device, dtype=str(dtype).removeprefix("torch."), gpu_name=gpu_name,
        attention=chosen, placement=plan, memory_saving=saving, source="tiny" if source is None else str(source.path),
        lora_layers=lora_layers, manifest=None if source is None else source.manifest(), lightning_fused=fused_at,
        quantised=quantised, safety=checker,
    )
    model.load_seconds = time.perf_counter() - started
    log.info(
        "model ready in %.1f s: variant=%s from %s device=%s%s dtype=%s precision=%s text_encoder_precision=%s "
        "lightning=%s (fused at %s, %d LoRA layers at load) attention=%s memory_saving=%s offload=%s compile=%s",
        model.load_seconds, settings.variant.name, model.source, device, f" ({gpu_name})" if gpu_name else "",
        model.dtype, settings.precision, settings.text_encoder_precision, settings.lightning, fused_at or "-",
        lora_layers, chosen.backend, ",".join(saving) or "off", plan.offload, settings.compile,
    )
    log.info("placement: %s", json.dumps(plan.info()))
    return model


def _build_pipeline(settings: Settings, source: sources.ModelSource | None, dtype: Any, device_map: str | None,
                    transformer: Any = None, text_encoder: Any = None) -> Any:
    import diffusers

    pipeline_class = getattr(diffusers, settings.variant.pipeline_class)
    if source is None:
        from . import tiny

        pipe = pipeline_class(**tiny.build_components(settings.variant, tiny.base_scheduler()))
        if dtype != pipe.transformer.dtype:  # built in float32; cast only for the GPU (bf16)
            pipe.to(dtype=dtype)
        return pipe
    path = source.path
    try:
        given = {name: part for name, part in (("transformer", transformer), ("text_encoder", text_encoder))
                 if part is not None}  # already read (and quantised) on their own
        pipe = pipeline_class.from_pretrained(str(path), dtype=dtype, local_files_only=True, device_map=device_map,
                                              **given)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ModelLoadError("MODEL_PATH", f"cannot load the pipeline from {path}: {err}") from None
    return pipe


def _transformer_by_block(settings: Settings, source: sources.ModelSource, dtype: Any, device: str,
                          home: str) -> tuple[Any, dict[str, Any]]:
    """The transformer read, fused (unless the bake fused it) and quantised block by block onto `home`."""
    import diffusers
    from safetensors import SafetensorError

    from . import by_block

    pipeline_class = getattr(diffusers, settings.variant.pipeline_class)
    lora = None
    if settings.lightning and not source.fused_lora:
        lora_path, setting = _lora_path(settings, source)
        lora = lightning_file.read(lora_path, setting, pipeline_class)
    try:
        return by_block.load_transformer(source.path / "transformer", diffusers.QwenImageTransformer2DModel, dtype,
                                         device, home, settings.precision, lora)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as err:
        if lightning_file.machine_fault(err):
            raise  # out of GPU memory, a CUDA error: unforeseen (fitness.py), not the folder's fault
        raise ModelLoadError("MODEL_PATH", f"cannot load the transformer from {source.path}: {err}") from None


def _text_encoder_early(source: sources.ModelSource, quantise_to: str, dtype: Any, device: str,
                        plan: placement.Plan) -> tuple[Any, dict[str, Any]]:
    """The text encoder read onto `device` and quantised there, kept on the GPU only when nothing is offloaded."""
    from . import text_encoder

    return text_encoder.load_text_encoder(source.path, dtype, device, device if plan.offload == "none" else "cpu",
                                          quantise_to)


def _check_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        reason = "does not exist" if not path.exists() else "has no model_index.json (not a diffusers pipeline folder)"
        raise ModelLoadError("MODEL_PATH", f"{path} {reason}; bake the model into the image or point MODEL_PATH at it")


def _plan(settings: Settings, path: Path, gpu_bytes: int | None, checker: Path | None) -> placement.Plan:
    """The placement for the folder's components at the precisions they will run in; logged with its numbers."""
    sizes = placement.model_bytes(path, settings.precision, settings.text_encoder_precision, checker)
    plan = placement.plan(sizes, gpu_bytes, settings.offload, **_plan_options(settings, gpu_bytes))
    log.info("placement: offload=%s (%s); component GB: %s", plan.offload, plan.reason,
             ", ".join(f"{k}={v / placement.GB:.1f}" for k, v in sizes.items()))
    if not plan.fits and settings.offload == "auto":
        raise ModelLoadError("OFFLOAD", plan.reason)
    if not plan.fits:
        log.warning("placement: OFFLOAD=%s does not fit this GPU: %s", settings.offload, plan.reason)
    return plan


def _plan_options(settings: Settings, gpu_bytes: int | None) -> dict[str, Any]:
    """What the plan needs to know beyond sizes: quantised activations, VAE tiling, the pipeline's kind."""
    return {"quantised": settings.precision != "bf16", "precision": settings.precision,
            "text_encoder_precision": settings.text_encoder_precision,
            "zero_cond_t": settings.variant.zero_cond_t,
            "vae_tiled": accel.memory_saving_enabled(settings.memory_saving, gpu_bytes),
            "edit_plus": settings.variant.pipeline_class != "QwenImageEditPipeline"}


def _stored_fits(stored: dict[str, int] | None, gpu_bytes: int | None) -> bool:
    """Whether every component fits the GPU as stored (before any quantisation at load), job room included."""
    return stored is not None and gpu_bytes is not None and placement.need("none", stored)[0] <= gpu_bytes


def _transformer_fits(stored: dict[str, int] | None, gpu_bytes: int | None) -> bool:
    """Whether the transformer alone fits the GPU as stored (else the fuse and quantisation run on the CPU)."""
    return _component_fits(stored, "transformer", gpu_bytes)


def _encoder_first(settings: Settings, source: sources.ModelSource, stored: dict[str, int] | None,
                   gpu_bytes: int | None) -> bool:
    """Whether the text encoder is read on its own and quantised on the device before the transformer.

    Only when it is quantised at load (a bf16 bake, TEXT_ENCODER_PRECISION int8|fp8) and its bf16 weights fit
    the GPU alone (no GPU: the same path on the CPU).
    """
    if settings.text_encoder_precision == _baked(source)[1]:
        return False
    return gpu_bytes is None or _component_fits(stored, "text_encoder", gpu_bytes)


def _component_fits(stored: dict[str, int] | None, component: str, gpu_bytes: int | None) -> bool:
    """Whether `component` alone fits the GPU as stored (bf16), with the CUDA reserve; never without a GPU."""
    if gpu_bytes is None:
        return False
    return stored is None or stored[component] + placement.RESERVE_BYTES <= gpu_bytes


def _resident_bytes(pipe: Any, checker: safety.Checker | None) -> dict[str, int]:
    """Bytes of each component's parameters and buffers (and the safety checker's) as they sit in memory now."""
    sizes = {name: sum(t.numel() * t.element_size() for t in (*part.parameters(), *part.buffers()))
             for name in placement.COMPONENTS if (part := getattr(pipe, name, None)) is not None}
    return sizes if checker is None else sizes | {"safety_checker": checker.resident_bytes()}



# --- Lightning and precision: what the bake already did is skipped, the rest is done here. ---

def _resolve_precision(settings: Settings, source: sources.ModelSource | None, cuda: bool,
                       capability: tuple[int, int] | None) -> Settings:
    """PRECISION=auto made concrete for this GPU (and bake); the loaded model reports the value chosen."""
    if settings.precision != "auto":
        return settings
    chosen = precision.resolve("auto", cuda, capability, _baked(source)[0])
    log.info("PRECISION=auto: %s (compute capability %s%s)", chosen,
             "none" if capability is None else f"{capability[0]}.{capability[1]}",
             "; as baked" if _baked(source)[0] != "bf16" else "")
    return dataclasses.replace(settings, precision=chosen)


def _check_precisions(settings: Settings, source: sources.ModelSource | None, cuda: bool,
                      capability: tuple[int, int] | None) -> None:
    """Before any weight is read: precisions this machine cannot run, settings that contradict the bake."""
    precision.check(settings.precision, "PRECISION", cuda, capability)
    precision.check(settings.text_encoder_precision, "TEXT_ENCODER_PRECISION", cuda, capability)
    if source is not None:
        source.check_settings(settings.lightning, settings.lora_path, settings.precision,
                              settings.text_encoder_precision)


def _apply_lightning(pipe: Any, settings: Settings, source: sources.ModelSource | None) -> tuple[int, str | None]:
    """Lightning scheduler, and the LoRA fused unless the bake fused it; (layers fused now, where fused)."""
    if not settings.lightning:
        return 0, None
    pipe.scheduler = lightning.lightning_scheduler(pipe.scheduler)
    if source is not None and source.fused_lora:
        log.info("Lightning LoRA %s was fused into the transformer at bake time: no LoRA work now", source.fused_lora)
        return 0, "bake"
    lora_path, setting = _lora_path(settings, source)
    return lightning.fuse_lightning(pipe, lora_path, setting), "load"


def _baked(source: sources.ModelSource | None) -> tuple[str, str]:
    return ("bf16", "bf16") if source is None else (source.transformer_precision, source.text_encoder_precision)


def _quantise_transformer(pipe: Any, settings: Settings, source: sources.ModelSource | None, device: str,
                          home: str) -> dict[str, Any]:
    """Quantise a bf16 bake at load, block by block on `device` (the GPU when there is one), each block left on
    `home`; {"transformer": where and how long}, or {} when the bake is already at PRECISION."""
    # check_settings allows only an equal precision or a bf16 bake: quantise only the latter.
    if settings.precision == _baked(source)[0]:
        return {}
    return {"transformer": precision.quantise_by_block(pipe.transformer, settings.precision, device, home)}


def _quantise_text_encoder(pipe: Any, settings: Settings, source: sources.ModelSource | None, device: str
                           ) -> dict[str, Any]:
    if settings.text_encoder_precision == _baked(source)[1]:
        return {}
    encoder = pipe.text_encoder
    # Layer by layer on the device (torchao creates fp8 only beside an sm89 GPU; the resident transformer leaves
    # no room for the whole bf16 encoder on 24 GB), each layer back where the encoder lives; offload moves it on.
    return {"text_encoder": precision.quantise_by_block(encoder, settings.text_encoder_precision, device,
                                                        encoder.device, precision.text_encoder_chosen(encoder))}


def _lora_path(settings: Settings, source: sources.ModelSource | None) -> tuple[Path, str]:
    """The LoRA file and the setting that names it (for error messages)."""
    if settings.lora_path is not None:
        return settings.lora_path, "LORA_PATH"
    if source is None:
        from . import tiny

        return tiny.default_lora_file(settings.variant), "TINY_MODEL"
    return source.default_lora(settings.variant), "LORA_PATH"
