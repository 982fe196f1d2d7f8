"""The load sequence: from the baked folder (or the tiny model built in code) to a ready pipeline, step by step.

Why this exists: loading is where a deployment goes wrong (a missing folder, a LoRA that does
not fit, a backend that cannot run) and where a cold start spends its seconds, so it is written
as its steps in order, each a function:
1. decide (model/choices.py): every check before a weight is read;
2. the text stage: the text encoder (read, quantised, hidden states only), then the VAE,
   tokenizer, processor and scheduler, the pipeline assembled without its transformer and, where
   the placement allows it, put where it runs: a job waiting at the start can encode its prompt
   now (`LoadEvents.text_ready`, serving/early_text.py) while the transformer is read;
3. the transformer: read (block by block when quantised at load), the Lightning LoRA fused,
   quantised, its attention backend and compile set, put where the plan keeps it;
4. the safety checker, the placement's offload hooks, the memory savers, the report.
Every step fails with a ModelLoadError that names the setting or file at fault, and the result
(model/loaded.py) records exactly what took effect.  Loading never reaches the network:
HF_HUB_OFFLINE is set and only local files are read.  The load log's `load timeline` line says
when each step ended, in seconds since the process started (bench/coldstart reads it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .. import placement, safety
from ..accounting.timing import process_seconds
from ..errors import ModelLoadError
from ..settings import Settings
from ..weights import lightning, lightning_file, precision
from . import accel, attention, choices, speedups, text_phase
from .choices import LoadPlan
from .loaded import LoadedModel, LoadEvents

log = logging.getLogger(__name__)
Part = tuple[Any, dict[str, Any]]  # a component read on its own, and the record of how it was (or {})
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)
TEXT_STAGE_FOLDERS = ("text_encoder", "vae", "tokenizer", "processor", "scheduler")


def load_model(settings: Settings, events: LoadEvents | None = None) -> LoadedModel:
    """Build the pipeline `settings` describe; raise ModelLoadError naming what is wrong."""
    events = events or LoadEvents()
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    import diffusers  # noqa: F401 (torch, diffusers, transformers and torchao: the imports a load waits for)
    import torchao  # noqa: F401
    import transformers  # noqa: F401

    timeline = {"imports_s": process_seconds()}
    how = choices.decide(settings)
    pipe, encoder = text_stage(how)
    events.read(TEXT_STAGE_FOLDERS, how.device if how.plan is not None and how.plan.offload == "none" else "cpu")
    if place_text_stage(how, pipe):
        events.text_ready(pipe)
    timeline["text_ready_s"] = process_seconds()
    lora_layers, fused_at, quantised = transformer_stage(how, pipe)
    events.read(("transformer", "lightning"), how.home)
    checker = safety.load_for(how.settings.safety_checker, how.checker_folder, how.device, how.dtype,
                              how.settings.tiny_safety_flags)
    events.read(("safety_checker",), how.device)
    timeline["read_s"] = process_seconds()
    plan = how.plan or placement.plan(_resident_bytes(pipe, checker), how.gpu_bytes, how.settings.offload,
                                      **choices.plan_options(how.settings, how.gpu_bytes))
    quantised |= {"text_encoder": encoder} if encoder else {}
    accel.place(pipe, plan.offload, how.cuda, text_placed=how.early_text)
    model = report(how, pipe, plan, checker, lora_layers, fused_at, quantised)
    model.load_seconds = time.perf_counter() - started
    timeline["ready_s"] = process_seconds()
    _log_ready(model, how, lora_layers, fused_at, plan, timeline)
    return model


# --- 2. The text stage: everything but the transformer ---

def text_stage(how: LoadPlan) -> tuple[Any, dict[str, Any]]:
    """The pipeline without its transformer (the tiny model: whole), the text encoder hidden-states-only and at
    TEXT_ENCODER_PRECISION; (pipe, how the encoder was quantised at load, or {})."""
    import diffusers

    pipeline_class = getattr(diffusers, how.settings.variant.pipeline_class)
    if how.source is None:
        from . import tiny

        pipe = pipeline_class(**tiny.build_components(how.settings.variant, tiny.base_scheduler()))
        if how.dtype != pipe.transformer.dtype:  # built in float32; cast only for the GPU (bf16)
            pipe.to(dtype=how.dtype)
        text_phase.hidden_states_only(pipe.text_encoder)
        return pipe, quantise_text_encoder(how, pipe.text_encoder)
    encoder, record = read_text_encoder(how)
    try:
        pipe = pipeline_class.from_pretrained(str(how.source.path), dtype=how.dtype, local_files_only=True,
                                              device_map=how.device_map, text_encoder=encoder, transformer=None)
    except LOAD_ERRORS as err:
        raise ModelLoadError("MODEL_PATH", f"cannot load the pipeline from {how.source.path}: {err}") from None
    return pipe, record


def read_text_encoder(how: LoadPlan) -> Part:
    """The text encoder alone: read onto the device and quantised there first when the bake is bf16 and
    TEXT_ENCODER_PRECISION int8|fp8 and the bf16 encoder fits the GPU alone (model/text_encoder.py), else read
    where the pipeline would put it and quantised layer by layer on the device if asked."""
    from . import text_encoder

    assert how.source is not None and how.plan is not None
    if how.encoder_first:
        home = how.device if how.plan.offload == "none" else "cpu"
        return text_encoder.load_text_encoder(how.source.path, how.dtype, how.device, home,
                                              how.settings.text_encoder_precision)
    model_class = text_encoder.encoder_class(how.source.path)
    try:
        encoder = model_class.from_pretrained(str(how.source.path / "text_encoder"), dtype=how.dtype,
                                              device_map=how.device_map, local_files_only=True)
    except LOAD_ERRORS as err:
        raise ModelLoadError("MODEL_PATH", f"cannot load the text encoder from {how.source.path}: {err}") from None
    text_phase.hidden_states_only(encoder)  # lm_head dropped before any quantisation: it never runs
    return encoder, quantise_text_encoder(how, encoder)


def quantise_text_encoder(how: LoadPlan, encoder: Any) -> dict[str, Any]:
    """TEXT_ENCODER_PRECISION over a bf16 bake when the encoder was not read first: layer by layer on the device
    (torchao creates fp8 only beside an sm89 GPU), each layer back where the encoder lives; {} when baked so."""
    if how.settings.text_encoder_precision == choices.baked(how.source)[1]:
        return {}
    return precision.quantise_by_block(encoder, how.settings.text_encoder_precision, how.device, encoder.device,
                                       precision.text_encoder_chosen(encoder))


def place_text_stage(how: LoadPlan, pipe: Any) -> bool:
    """The text encoder and VAE where they run, before the transformer comes, when the placement allows prompts
    to be encoded then (model/choices.py `early_text`); whether it did."""
    if not how.early_text:
        return False
    accel.place_text_stage(pipe, how.plan.offload if how.plan is not None else "none", how.cuda)
    return True


# --- 3. The transformer ---

def transformer_stage(how: LoadPlan, pipe: Any) -> tuple[int, str | None, dict[str, Any]]:
    """The transformer read (unless built in code), Lightning (scheduler and LoRA, fused unless the bake or the
    block-by-block read fused it), quantised when the bake is bf16, attention and compile set, and left where
    the plan keeps it; (LoRA layers fused now, where fused, {"transformer": how it was quantised at load})."""
    settings, source = how.settings, how.source
    if source is not None and how.by_block:
        transformer, record = read_transformer_by_block(how)
        pipe.register_modules(transformer=transformer)
        pipe.scheduler = lightning.lightning_scheduler(pipe.scheduler) if settings.lightning else pipe.scheduler
        fused_at = None if not settings.lightning else "bake" if source.fused_lora else "load"
        lora_layers, quantised = record["lora_layers"], {"transformer": record}
    else:
        if source is not None:
            pipe.register_modules(transformer=read_transformer(how))
        if how.cuda and not how.straight and how.transformer_fits:
            pipe.transformer.to(how.device)  # fuse and quantise on the GPU; the placement takes it from there
        lora_layers, fused_at = _apply_lightning(pipe, settings, source)
        quantised = {}
        if settings.precision != choices.baked(source)[0]:  # check_settings allows only an equal precision or bf16
            # After the fuse (never a bf16 LoRA over quantised weights); block by block onto where the plan keeps it.
            quantised["transformer"] = precision.quantise_by_block(pipe.transformer, settings.precision, how.device,
                                                                   how.home)
    attention.apply(pipe.transformer, how.attention.backend)
    if settings.compile == "regional":
        speedups.compile_regional(pipe.transformer)
    pipe.transformer.to(how.home)  # its unquantised layers (norms, embeddings) follow the quantised ones
    return lora_layers, fused_at, quantised


def read_transformer(how: LoadPlan) -> Any:
    """The transformer as stored, straight onto the GPU when it fits there alone (it is fused there, and stays
    or goes where the plan keeps it): no whole copy in host memory on the way; else where from_pretrained puts
    it."""
    import diffusers

    assert how.source is not None
    folder = how.source.path / "transformer"
    device_map = how.device if how.cuda and how.transformer_fits else how.device_map
    try:
        return diffusers.QwenImageTransformer2DModel.from_pretrained(str(folder), dtype=how.dtype,
                                                                     device_map=device_map, local_files_only=True)
    except LOAD_ERRORS as err:
        if lightning_file.machine_fault(err):
            raise  # out of GPU memory, a CUDA error: this machine's (serving/worker.py), not the folder's fault
        raise ModelLoadError("MODEL_PATH", f"cannot load the transformer from {how.source.path}: {err}") from None


def read_transformer_by_block(how: LoadPlan) -> Part:
    """A bf16 bake quantised at load: the transformer read, fused (unless the bake fused it) and quantised block
    by block onto where the plan keeps it (model/by_block.py)."""
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
    except (*LOAD_ERRORS, SafetensorError) as err:
        if lightning_file.machine_fault(err):
            raise  # out of GPU memory, a CUDA error: this machine's (serving/worker.py), not the folder's fault
        raise ModelLoadError("MODEL_PATH", f"cannot load the transformer from {source.path}: {err}") from None


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


# --- 4. The report ---

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


def _log_ready(model: LoadedModel, how: LoadPlan, lora_layers: int, fused_at: str | None, plan: placement.Plan,
               timeline: dict[str, float]) -> None:
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
    log.info("load timeline: %s", json.dumps({k: round(v, 3) for k, v in timeline.items()}))
