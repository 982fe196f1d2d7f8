"""The job machinery of bench/gpu-session: a worker over random real-shaped weights, timed jobs, records.

Why this exists: a lent GPU gives one call of at most 9 minutes, so every figure must be written
the moment it is measured (`Step.emit`: one flushed JSON line) and no step may starve the next
(the parent kills a step at its budget; inside, `Step.has` skips what no longer fits).  Jobs go
through the real `Worker.handle`, exactly as a deployed job runs (parse, decode, GPU section,
PNG, base64, timing); only the model comes from `build_model` (random weights at the real shapes,
or the tiny model with --tiny) instead of a 58 GB folder no hub can supply here.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import benchlib
import realshapes
import session_results
from qwen_edit_worker import placement
from qwen_edit_worker.model import accel, attention, speedups, text_phase, tiny
from qwen_edit_worker.model.loaded import LoadedModel
from qwen_edit_worker.safety import tiny as safety_tiny
from qwen_edit_worker.serving.engine import Editor
from qwen_edit_worker.serving.worker import WARM_UP_SIZE, WARM_UP_SIZE_TINY, Worker
from qwen_edit_worker.settings import Settings
from qwen_edit_worker.weights import lightning, precision
from standin import photo

VARIANT = "edit-2511"
SIZES = (1.0, 0.5, 2.0)  # most important first
CUDA = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
BASE_ENV = {"MODEL_VARIANT": VARIANT, "WARMUP": "0", "MAX_RESPONSE_BYTES": "400000000"}  # 4 PNGs at 2 MP


@dataclass
class Step:
    """One step's output file, name, mode and deadline."""

    out: Path
    name: str
    tiny: bool
    deadline: float
    profile_over_ms: float = 1200.0
    scratch: Path = Path("/tmp/gpu-session")

    def emit(self, kind: str, **fields: Any) -> None:
        session_results.emit(self.out / session_results.LINES, {"kind": kind, "step": self.name, **fields})

    def has(self, seconds: float, what: str) -> bool:
        """Whether `seconds` fit before the deadline; if not, record `what` as skipped."""
        left = self.deadline - time.monotonic()
        if left >= seconds:
            return True
        self.emit("skipped", what=what, reason=f"step budget: {left:.0f} s left, about {seconds:.0f} s needed")
        return False


class SessionWorker(Worker):
    """The real Worker, its model built by `build` instead of read from MODEL_PATH."""

    def __init__(self, env: dict[str, str], build: Any) -> None:
        self._build = build
        self.compile_seconds = 0.0
        super().__init__(env)

    def _load(self) -> Editor:  # as Worker._load: compile at load, so no job pays for it
        assert self.settings is not None
        editor = Editor(self._build(self.settings))
        if self.settings.compile == "regional":
            size = WARM_UP_SIZE_TINY if self.settings.tiny_model else WARM_UP_SIZE
            self.compile_seconds = speedups.warm_up(editor.warm_up, size)
            editor.model.load_seconds += self.compile_seconds
        return editor


def new_transformer(tiny_mode: bool, seed: int = 0) -> Any:
    """The transformer alone, the same weights as `build_model`'s for the same seed."""
    variant = Settings.from_env({"MODEL_VARIANT": VARIANT}).variant
    if tiny_mode:
        return tiny.build_components(variant, tiny.base_scheduler())["transformer"]
    return realshapes.transformer(DEVICE, DTYPE, zero_cond_t=variant.zero_cond_t, seed=seed)


def build_model(settings: Settings, tiny_mode: bool, gpu_bytes: int | None = None, seed: int = 0) -> LoadedModel:
    """The pipeline as the loader leaves it (quantised, attention set, compiled, placed), random weights."""
    import diffusers

    cls = getattr(diffusers, settings.variant.pipeline_class)
    if tiny_mode:
        pipe = cls(**tiny.build_components(settings.variant, lightning.lightning_scheduler(tiny.base_scheduler())))
    else:
        pipe = cls(**realshapes.components(DEVICE, DTYPE, settings.variant.zero_cond_t, seed))
    text_phase.hidden_states_only(pipe.text_encoder)  # as the load sequence does: no lm_head, no logits
    if settings.precision != "bf16":
        precision.quantise_transformer(pipe.transformer, settings.precision)
    seq = 256 if tiny_mode else attention.sequence_length(settings.variant)
    measure = attention.measurer(seq, device=DEVICE, dtype=DTYPE, budget=0.05 if tiny_mode else 0.15)
    choice = attention.choose(settings.attention_backend, CUDA or tiny_mode, measure)  # tiny: CPU timings
    attention.apply(pipe.transformer, choice.backend)
    if settings.compile == "regional":
        speedups.compile_regional(pipe.transformer)
    gpu_bytes = gpu_bytes or (torch.cuda.get_device_properties(0).total_memory if CUDA else None)
    checker = None if settings.safety_checker == "off" else (
        safety_tiny.build(DEVICE, DTYPE) if tiny_mode else realshapes.safety_checker(DEVICE, DTYPE))
    sizes = _resident(pipe) | ({} if checker is None else {"safety_checker": checker.resident_bytes()})
    plan = placement.plan(sizes, gpu_bytes, mode=settings.offload if CUDA else "auto")
    if plan.offload != "none":
        pipe.text_encoder.to("cpu")
    accel.place(pipe, plan.offload, CUDA)
    saving = accel.apply_memory_saving(pipe) if accel.memory_saving_enabled(settings.memory_saving, gpu_bytes) else []
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, settings=settings, device=DEVICE, dtype=str(DTYPE).removeprefix("torch."),
                       gpu_name=torch.cuda.get_device_name(0) if CUDA else None, attention=choice, placement=plan,
                       memory_saving=saving, source="tiny" if tiny_mode else "random real-shaped weights",
                       lora_layers=0, safety=checker)


def _resident(pipe: Any) -> dict[str, int]:
    return {n: sum(t.numel() * t.element_size() for t in (*p.parameters(), *p.buffers()))
            for n in placement.COMPONENTS if (p := getattr(pipe, n, None)) is not None}


_PICTURES: dict[tuple[int, int], str] = {}


def job(step: Step, megapixels: float, num_images: int = 1) -> dict[str, Any]:
    """A job of the given size: a photo-like PNG in, PNG base64 out, seed 1 (tiny: 64-96 px sides)."""
    side = max(64, round((megapixels ** 0.5) * (64 if step.tiny else 1024) / 16) * 16)
    if (side, side) not in _PICTURES:
        buffer = io.BytesIO()
        photo(side, side).save(buffer, "PNG")
        _PICTURES[(side, side)] = base64.b64encode(buffer.getvalue()).decode()
    size = {"width": side, "height": side} if step.tiny else {"megapixels": megapixels}
    return {"id": f"session-{megapixels}-{num_images}",
            "input": {"prompt": "make the sky a sunset, keep everything else", "image": _PICTURES[(side, side)],
                      "seed": 1, "num_images": num_images, "output_format": "png", **size}}


def run_job(step: Step, worker: Worker, megapixels: float, num_images: int = 1, first: bool = False,
            record: bool = True, **extra: Any) -> dict[str, Any]:
    """One job through Worker.handle, timed from outside too; the run record (emitted unless record=False)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if CUDA else None
    started = time.perf_counter()
    out = worker.handle(job(step, megapixels, num_images))
    job_ms = (time.perf_counter() - started) * 1000
    run: dict[str, Any] = {"variant": VARIANT, "megapixels": megapixels, "num_images": num_images, "first": first,
                           "job_ms": round(job_ms, 2), "resident_gpu_bytes": resident,
                           "peak_gpu_bytes": torch.cuda.max_memory_allocated() if CUDA else None, **extra}
    if "error" in out:
        run.update(outcome="oom" if out.get("refresh_worker") else "error", error=out["error"][:300])
    else:
        timing, model = out["timing"], out["model"]
        stages = {k.removesuffix("_ms"): v for k, v in timing.items()
                  if k.endswith("_ms") and k not in ("total_ms", "load_ms", "gpu_ms")}
        run.update(outcome="ok", attention_backend=model["attention_backend"], precision=model["precision"],
                   compile=model["compile"], offload=model["offload"], stages_ms=stages,
                   ms_per_step=timing["ms_per_step"], handler_total_ms=timing["total_ms"],
                   outside_gpu_ms=round(job_ms - sum(stages.get(s, 0.0) for s in session_results.GPU_STAGES), 2),
                   width=out["images"][0]["width"], height=out["images"][0]["height"], images=out["images"],
                   vae_tiled="vae_tiling" in model["memory_saving"])
    if record:
        step.emit("run", **{k: v for k, v in run.items() if k != "images"})
    return run


def pixels(run: dict[str, Any]) -> np.ndarray:
    data = base64.b64decode(run["images"][0]["image"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def rel_l2_pct(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return round(float(100 * np.linalg.norm(a - b) / np.linalg.norm(b)), 4)


def free() -> None:
    import gc

    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def editor_of(worker: Worker) -> Editor:
    return worker.model.get()[0]


def loaded(step: Step, env: dict[str, str], gpu_bytes: int | None = None) -> SessionWorker:
    """A SessionWorker with its model loaded now (the load's seconds and attention choice recorded)."""
    worker = SessionWorker({**BASE_ENV, **env}, lambda s: build_model(s, step.tiny, gpu_bytes))
    started = time.perf_counter()
    model = editor_of(worker).model
    step.emit("load", seconds=round(time.perf_counter() - started, 2), compile_s=round(worker.compile_seconds, 2),
              attention=model.attention.backend, attention_ms=model.attention.timings_ms,
              unusable=model.attention.unusable, placement=model.placement.info(), memory_saving=model.memory_saving,
              settings={k: v for k, v in env.items()})
    return worker


def step_flops(megapixels: float) -> float:
    return benchlib.pass_flops(VARIANT, megapixels)


def swap_transformer(worker: Worker, value: str, tiny_mode: bool) -> None:
    """Replace the worker's transformer by a fresh one of the same seed at precision `value`."""
    model = editor_of(worker).model
    model.pipe.transformer = None
    free()
    fresh = new_transformer(tiny_mode)
    if value != "bf16":
        precision.quantise_transformer(fresh, value)
    attention.apply(fresh, model.attention.backend)
    model.pipe.transformer = fresh.to(DEVICE)
    model.settings = replace(model.settings, precision=value)
