"""The load sequence: from the baked folder (or the tiny model built in code) to a ready pipeline, step by step.

Why this exists: loading is where a deployment goes wrong (a missing folder, a LoRA that does
not fit, a backend that cannot run) and where a cold start spends its seconds, so it is written
as its steps in order, each a function: decide (model/choices.py: every check before a weight is
read), read the text encoder, read the transformer, assemble the pipeline, load the safety
checker, the Lightning LoRA and precision, settle the transformer, place the components, report.
Every step fails with a ModelLoadError that names the setting or file at fault, and the result
(model/loaded.py) records exactly what took effect.  Loading never reaches the network:
HF_HUB_OFFLINE is set and only local files are read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .. import placement, safety
from ..errors import ModelLoadError
from ..settings import Settings
from ..weights import lightning, lightning_file, precision
from . import accel, attention, choices, speedups, text_phase
from .choices import LoadPlan
from .loaded import LoadedModel

log = logging.getLogger(__name__)
Part = tuple[Any, dict[str, Any]]  # a component read on its own, and the record of how


def load_model(settings: Settings) -> LoadedModel:
    """Build the pipeline `settings` describe; raise ModelLoadError naming what is wrong."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    how = choices.decide(settings)
    encoder = read_text_encoder(how)
    transformer = read_transformer(how)
    pipe = assemble(how, transformer, encoder)
    text_phase.hidden_states_only(pipe.text_encoder)  # before quantising it and before offload hooks wrap it
    checker = safety.load_for(how.settings.safety_checker, how.checker_folder, how.device, how.dtype,
                              how.settings.tiny_safety_flags)
    plan = how.plan or placement.plan(_resident_bytes(pipe, checker), how.gpu_bytes, how.settings.offload,
                                      **choices.plan_options(how.settings, how.gpu_bytes))
    resident = plan.offload in ("none", "text_encoder")
    lora_layers, fused_at, quantised = lightning_and_precision(how, pipe, transformer, resident)
    settle_transformer(how, pipe, resident)
    quantised.update(quantise_text_encoder(how, pipe) if encoder is None else {"text_encoder": encoder[1]})
    accel.place(pipe, plan.offload, how.cuda)
    model = report(how, pipe, plan, checker, lora_layers, fused_at, quantised)
    model.load_seconds = time.perf_counter() - started
    _log_ready(model, how, lora_layers, fused_at, plan)
    return model


def read_text_encoder(how: LoadPlan) -> Part | None:
    """A bf16 bake with TEXT_ENCODER_PRECISION int8|fp8: the encoder read onto the device and quantised there,
    while the GPU is still empty, and kept on the GPU only when nothing is offloaded (model/text_encoder.py)."""
    if not how.encoder_first:
        return None
    from . import text_encoder

    assert how.source is not None and how.plan is not None
    home = how.device if how.plan.offload == "none" else "cpu"
    return text_encoder.load_text_encoder(how.source.path, how.dtype, how.device, home,
                                          how.settings.text_encoder_precision)


def read_transformer(how: LoadPlan) -> Part | None:
    """A bf16 bake quantised at load: the transformer read, fused (unless the bake fused it) and quantised block
    by block onto where the plan keeps it (model/by_block.py)."""
    if not how.by_block:
        return None
    import diffusers
    from safetensors import SafetensorError

    from . import by_block

    settings, source = how.settings, how.source
    assert source is not None
    lora = None
    if settings.lightning and not source.fused_lora:
        lora_path, setting = choices.lora_path(settings, source)
        lora = lightning_file.read(lora_path, setting, getattr(diffusers, settings.variant.pipeline_class))
    try:
        return by_block.load_transformer(source.path / "transformer", diffusers.QwenImageTransformer2DModel,
                                         how.dtype, how.device, how.home, settings.precision, lora)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as err:
        if lightning_file.machine_fault(err):
            raise  # out of GPU memory, a CUDA error: unforeseen (fitness.py), not the folder's fault
        raise ModelLoadError("MODEL_PATH", f"cannot load the transformer from {source.path}: {err}") from None


def assemble(how: LoadPlan, transformer: Part | None, encoder: Part | None) -> Any:
    """The pipeline: the tiny one built in code, or `from_pretrained` with the parts already read handed in.

    When everything fits as stored, weights are read straight onto the device (no CPU copy).
    """
    import diffusers

    pipeline_class = getattr(diffusers, how.settings.variant.pipeline_class)
    if how.source is None:
        from . import tiny

        pipe = pipeline_class(**tiny.build_components(how.settings.variant, tiny.base_scheduler()))
        if how.dtype != pipe.transformer.dtype:  # built in float32; cast only for the GPU (bf16)
            pipe.to(dtype=how.dtype)
        return pipe
    path = how.source.path
    given = {name: part[0] for name, part in (("transformer", transformer), ("text_encoder", encoder))
             if part is not None}  # already read (and quantised) on their own
    device_map = how.device if how.straight or not how.cuda else None
    try:
        return pipeline_class.from_pretrained(str(path), dtype=how.dtype, local_files_only=True, device_map=device_map,
                                              **given)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise ModelLoadError("MODEL_PATH", f"cannot load the pipeline from {path}: {err}") from None


def lightning_and_precision(how: LoadPlan, pipe: Any, transformer: Part | None, resident: bool
                            ) -> tuple[int, str | None, dict[str, Any]]:
    """The Lightning scheduler and LoRA (fused unless the bake or the block-by-block read fused it), then the
    transformer quantised when the bake is bf16; (layers fused now, where fused, {component: record})."""
    settings, source = how.settings, how.source
    if transformer is not None:  # read_transformer fused and quantised it already
        pipe.scheduler = lightning.lightning_scheduler(pipe.scheduler) if settings.lightning else pipe.scheduler
        fused_at = None if not settings.lightning else "bake" if source is not None and source.fused_lora else "load"
        return transformer[1]["lora_layers"], fused_at, {"transformer": transformer[1]}
    if how.cuda and not how.straight and how.transformer_fits:
        pipe.transformer.to(how.device)  # fuse and quantise on the GPU; the placement takes it from there
    lora_layers, fused_at = _apply_lightning(pipe, settings, source)
    if settings.precision == choices.baked(source)[0]:  # check_settings allows only an equal precision or bf16
        return lora_layers, fused_at, {}
    # After the fuse (never a bf16 LoRA over quantised weights); block by block onto where the plan keeps it.
    record = precision.quantise_by_block(pipe.transformer, settings.precision, how.device,
                                         how.device if resident else "cpu")
    return lora_layers, fused_at, {"transformer": record}


def _apply_lightning(pipe: Any, settings: Settings, source: Any) -> tuple[int, str | None]:
    """Lightning scheduler, and the LoRA fused unless the bake fused it; (layers fused now, where fused)."""
    if not settings.lightning:
        return 0, None
    pipe.scheduler = lightning.lightning_scheduler(pipe.scheduler)
    if source is not None and source.fused_lora:
        log.info("Lightning LoRA %s was fused into the transformer at bake time: no LoRA work now", source.fused_lora)
        return 0, "bake"
    lora_path, setting = choices.lora_path(settings, source)
    return lightning.fuse_lightning(pipe, lora_path, setting), "load"


def settle_transformer(how: LoadPlan, pipe: Any, resident: bool) -> None:
    """The attention backend, COMPILE, and the transformer where the plan keeps it (its unquantised layers,
    norms and embeddings, follow the quantised ones)."""
    attention.apply(pipe.transformer, how.attention.backend)
    if how.settings.compile == "regional":
        speedups.compile_regional(pipe.transformer)
    pipe.transformer.to(how.device if resident else "cpu")


def quantise_text_encoder(how: LoadPlan, pipe: Any) -> dict[str, Any]:
    """TEXT_ENCODER_PRECISION over a bf16 bake when the encoder was not read first: layer by layer on the device
    (torchao creates fp8 only beside an sm89 GPU; the resident transformer leaves no room for the whole bf16
    encoder on 24 GB), each layer back where the encoder lives; offload moves it on."""
    if how.settings.text_encoder_precision == choices.baked(how.source)[1]:
        return {}
    encoder = pipe.text_encoder
    return {"text_encoder": precision.quantise_by_block(encoder, how.settings.text_encoder_precision, how.device,
                                                        encoder.device, precision.text_encoder_chosen(encoder))}


def report(how: LoadPlan, pipe: Any, plan: placement.Plan, checker: safety.Checker | None, lora_layers: int,
           fused_at: str | None, quantised: dict[str, Any]) -> LoadedModel:
    """The memory savers applied, and the LoadedModel recording what took effect."""
    import torch

    saving = accel.apply_memory_saving(pipe) if accel.memory_saving_enabled(
        how.settings.memory_saving, how.gpu_bytes) else []
    pipe.set_progress_bar_config(disable=True)
    source = how.source
    return LoadedModel(
        pipe=pipe, settings=how.settings, device=how.device, dtype=str(how.dtype).removeprefix("torch."),
        gpu_name=torch.cuda.get_device_name(0) if how.cuda else None, attention=how.attention, placement=plan,
        memory_saving=saving, source="tiny" if source is None else str(source.path), lora_layers=lora_layers,
        manifest=None if source is None else source.manifest(), lightning_fused=fused_at, quantised=quantised,
        safety=checker,
    )


def _resident_bytes(pipe: Any, checker: safety.Checker | None) -> dict[str, int]:
    """Bytes of each component's parameters and buffers (and the safety checker's) as they sit in memory now."""
    sizes = {name: sum(t.numel() * t.element_size() for t in (*part.parameters(), *part.buffers()))
             for name in placement.COMPONENTS if (part := getattr(pipe, name, None)) is not None}
    return sizes if checker is None else sizes | {"safety_checker": checker.resident_bytes()}


def _log_ready(model: LoadedModel, how: LoadPlan, lora_layers: int, fused_at: str | None,
               plan: placement.Plan) -> None:
    settings = how.settings
    log.info(
        "model ready in %.1f s: variant=%s from %s device=%s%s dtype=%s precision=%s text_encoder_precision=%s "
        "lightning=%s (fused at %s, %d LoRA layers at load) attention=%s memory_saving=%s offload=%s compile=%s",
        model.load_seconds, settings.variant.name, model.source, model.device,
        f" ({model.gpu_name})" if model.gpu_name else "", model.dtype, settings.precision,
        settings.text_encoder_precision, settings.lightning, fused_at or "-", lora_layers, how.attention.backend,
        ",".join(model.memory_saving) or "off", plan.offload, settings.compile,
    )
    log.info("placement: %s", json.dumps(plan.info()))
