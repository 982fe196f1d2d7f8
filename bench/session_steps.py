"""The steps of bench/gpu-session, most important first; each a function of its `Step`.

Why this exists: issue 17's one device call measures, in order, the environment and the GPU's
real bf16 peak, whole warm jobs, the attention backends, int8/fp8, a simulated 24 GB card,
COMPILE=regional and a cold start from disk.  Each function here is one of those, writes each
figure as it is measured (session_jobs.Step.emit) and checks its own deadline before each job.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import realshapes
from qwen_edit_worker.accounting.timing import StageClock
from qwen_edit_worker.model import attention, tiny
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights import precision
from session_jobs import (
    CUDA,
    DEVICE,
    DTYPE,
    SIZES,
    VARIANT,
    Step,
    editor_of,
    free,
    loaded,
    pixels,
    rel_l2_pct,
    run_job,
    step_flops,
    swap_transformer,
)

PACKAGES = ("torch", "diffusers", "transformers", "tokenizers", "huggingface-hub", "peft", "accelerate", "torchao",
            "xformers", "flash-attn", "safetensors", "numpy", "pillow", "runpod", "pybase64", "isal")
CAP_BYTES = 24 * 1000**3  # the simulated card (a 24 GB class)


def env(step: Step) -> None:
    """Versions, the GPU and driver, and the bf16 matrix-product rate measured on it."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    record: dict[str, Any] = {"date": dt.date.today().isoformat(), "python": platform.python_version(),
                              "torch": torch.__version__, "cuda": torch.version.cuda, "packages": versions,
                              "gpu": torch.cuda.get_device_name(0) if CUDA else None, "cores": os.cpu_count()}
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        record.update(capability=list(torch.cuda.get_device_capability(0)), gpu_bytes=props.total_memory,
                      multiprocessors=props.multi_processor_count)
        try:
            record["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            record["driver"] = f"unknown ({err})"
    step.emit("env", **record)  # first, before anything below can crash the process
    n = 8192 if CUDA else 512
    a, b = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    ms = _median_ms(lambda: a @ b, 10)
    step.emit("env", **{"peak_bf16_tflops" if CUDA else "cpu_matmul_tflops": round(2 * n**3 / (ms / 1000) / 1e12, 1)})
    try:
        import xformers.ops  # noqa: F401  (does the carried wheel load beside this torch?)

        step.emit("env", xformers_import="ok")
    except Exception as err:  # its error is the finding
        step.emit("env", xformers_import=f"{type(err).__name__}: {str(err)[:200]}")


def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        if CUDA:
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def warm_jobs(step: Step) -> None:
    """bf16, auto attention: 1 MP (first, then 3 warm), 0.5 and 2 MP; a profile if 1 MP is over the mark."""
    worker = loaded(step, {"ATTENTION_BACKEND": "auto"})
    one_mp: list[float] = []
    for mp in SIZES:
        for repeat in range(4 if mp == 1.0 else 3):
            if not step.has(8 * mp + 2, f"job {mp} MP #{repeat}"):
                break
            run = run_job(step, worker, mp, first=repeat == 0, repeat=repeat)
            if mp == 1.0 and repeat and run["outcome"] == "ok":
                one_mp.append(run["job_ms"])
    if one_mp and float(np.median(one_mp)) > step.profile_over_ms and step.has(15, "profile"):
        profile(step, worker, float(np.median(one_mp)))


def profile(step: Step, worker: Worker, job_ms: float) -> None:
    """torch.profiler over one warm 1 MP job: the table to profile.txt, the top operators as a record."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    prof = profiler(activities=activities)
    section = editor_of(worker).section  # the model runs on the GPU section's thread: profile there
    section.run(StageClock(), prof.__enter__)
    try:
        run_job(step, worker, 1.0, record=False)
    finally:
        section.run(StageClock(), lambda: prof.__exit__(None, None, None))
    events = prof.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    for key in (("self_device_time_total", "self_cuda_time_total") if CUDA else ()) + ("self_cpu_time_total",):
        try:  # the sort key's name moved from cuda to device across torch versions
            (step.out / "profile.txt").write_text(events.table(sort_by=key, row_limit=40))
            break
        except (AttributeError, KeyError, ValueError):
            continue
    ranked = sorted(events, key=lambda e: device_us(e) if CUDA else e.self_cpu_time_total, reverse=True)[:20]
    step.emit("profile", job_ms=round(job_ms, 1), threshold_ms=step.profile_over_ms,
              total_self_device_ms=round(sum(device_us(e) for e in events) / 1000, 2),
              top=[{"name": e.key[:80], "calls": e.count, "self_device_ms": round(device_us(e) / 1000, 3),
                    "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3)} for e in ranked])


def attention_backends(step: Step) -> None:
    """Every backend auto's measurer runs, per attention call and per whole transformer step at 1 MP."""
    worker = loaded(step, {"ATTENTION_BACKEND": "auto"})
    model = editor_of(worker).model
    seq = 256 if step.tiny else attention.sequence_length(model.settings.variant)
    call_flops = 4 * seq * seq * attention.HEADS * attention.HEAD_DIM
    for name, ms in model.attention.timings_ms.items():
        step.emit("attention_call", backend=name, call_ms=ms, seq_len=seq,
                  call_tflops=round(call_flops / (ms / 1000) / 1e12, 1) if ms else None)
    for name, why in model.attention.unusable.items():
        step.emit("attention", backend=name, unusable=why)
    for name, call_ms in model.attention.timings_ms.items():
        if not step.has(10, f"backend {name}"):
            break
        attention.apply(model.pipe.transformer, name)
        model.attention = attention.AttentionChoice(name, "bench/gpu-session", model.attention.timings_ms)
        run_job(step, worker, 1.0, first=True)
        run = run_job(step, worker, 1.0)
        per_step = run.get("ms_per_step")
        tflops = None if step.tiny or not per_step else round(step_flops(1.0) / (per_step / 1000) / 1e12, 1)
        step.emit("attention", backend=name, ms_per_step=per_step, step_tflops=tflops, call_ms=call_ms,
                  call_tflops=round(call_flops / (call_ms / 1000) / 1e12, 1) if call_ms else None)


class FirstOutput:
    """Keeps the first output of a module's forward (the first transformer step of a job)."""

    def __init__(self, module: Any) -> None:
        self.first: torch.Tensor | None = None
        self.hook = module.register_forward_hook(self._keep)

    def _keep(self, module: Any, args: Any, out: Any) -> None:
        if self.first is None:
            self.first = out[0].float().cpu()


def precisions(step: Step) -> None:
    """bf16 then int8 and fp8 transformers of the same seed: per step, peak, relative L2 of step 1 and pixels."""
    worker = loaded(step, {"ATTENTION_BACKEND": "auto"})
    model = editor_of(worker).model
    results = {}
    for value in ("bf16", "int8", "fp8"):
        try:
            precision.check(value, "PRECISION", CUDA, torch.cuda.get_device_capability(0) if CUDA else None)
        except Exception as err:  # this machine cannot run it: that is the row
            step.emit("deviation", precision=value, note=str(err)[:160])
            continue
        if not step.has(25, f"precision {value}"):
            break
        if value != "bf16":
            swap_transformer(worker, value, step.tiny)
        run_job(step, worker, 1.0, first=True)
        outputs = FirstOutput(model.pipe.transformer)
        run = run_job(step, worker, 1.0)
        outputs.hook.remove()
        if run["outcome"] != "ok" or outputs.first is None:
            step.emit("deviation", precision=value, note=run.get("error"))
            continue
        results[value] = (outputs.first, pixels(run))
        row = {"ms_per_step": run["ms_per_step"], "peak_gpu_bytes": run["peak_gpu_bytes"], "job_ms": run["job_ms"]}
        if value != "bf16" and "bf16" in results:
            row.update(step_rel_l2_pct=rel_l2_pct(results[value][0], results["bf16"][0]),
                       pixels_rel_l2_pct=rel_l2_pct(results[value][1], results["bf16"][1]))
        step.emit("deviation", precision=value, weights=model.source, **row)


def memory_24gb(step: Step) -> None:
    """A 24 GB card: allocator capped, int8/fp8 transformer resident, text encoder streamed; 1-2 MP, 1 and 4 images."""
    cap = CAP_BYTES if CUDA else None
    worker = loaded(step, {"ATTENTION_BACKEND": "auto", "PRECISION": "int8", "OFFLOAD": "text_encoder"}, cap)
    total = torch.cuda.get_device_properties(0).total_memory if CUDA else None
    for value in ("int8", "fp8"):
        if value == "fp8":
            if not CUDA or not step.has(60, "fp8 on 24 GB"):
                step.emit("skipped", what="fp8 on 24 GB", reason="no CUDA GPU" if not CUDA else "step budget")
                break
            torch.cuda.set_per_process_memory_fraction(1.0)
            swap_transformer(worker, value, step.tiny)
        if CUDA:
            free()
            torch.cuda.set_per_process_memory_fraction(cap / total)
        for mp, n, first in ((1.0, 1, True), (1.0, 1, False), (1.0, 4, False), (2.0, 1, False), (2.0, 4, False)):
            if not step.has(6 * mp * n, f"{value} {mp} MP x{n} on 24 GB"):
                break
            run_job(step, worker, mp, n, first=first, memory_cap_bytes=cap, simulated=CUDA)


def compiled(step: Step) -> None:
    """COMPILE=regional: compile and warm-up seconds at load, per step warm, first job at a new size."""
    worker = loaded(step, {"ATTENTION_BACKEND": "auto", "COMPILE": "regional"})
    runs = [run_job(step, worker, 1.0, first=i == 0) for i in range(3) if step.has(8, f"compiled job {i}")]
    new_size = run_job(step, worker, 0.5, first=True) if step.has(40, "compiled job at a new size") else {}
    ok = [r["ms_per_step"] for r in runs[1:] if r["outcome"] == "ok"]
    step.emit("compile", compile_s=round(worker.compile_seconds, 2),
              ms_per_step=float(np.median(ok)) if ok else None, new_size_job_ms=new_size.get("job_ms"),
              off_ms_per_step=_off_ms_per_step(step))


def _off_ms_per_step(step: Step) -> float | None:
    """The warm 1 MP bf16 per-step time of the warm_jobs step, read back from the lines written so far."""
    import session_results

    records, _ = session_results.read(step.out / session_results.LINES)
    steps = [r["ms_per_step"] for r in records if r.get("kind") == "run" and r.get("step") == "warm_jobs"
             and r.get("megapixels") == 1.0 and not r.get("first") and r.get("outcome") == "ok"]
    return float(np.median(steps)) if steps else None


def cold_start(step: Step) -> None:
    """A real-shaped folder saved with save_pretrained, then loaded by the worker's own loader and run once."""
    import diffusers

    from qwen_edit_worker.weights.variants import VARIANTS

    variant, folder = VARIANTS[VARIANT], step.scratch / "model"
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    cls = getattr(diffusers, variant.pipeline_class)
    if step.tiny:
        pipe = cls(**tiny.build_components(variant, tiny.base_scheduler()))
    else:  # the text encoder at real width with one layer: the disk holds the transformer, not two models
        pipe = cls(**realshapes.components(DEVICE, DTYPE, variant.zero_cond_t, seed=0, text_layers=1))
    built = time.perf_counter()
    pipe.save_pretrained(folder)
    lora = folder / "lightning" / variant.lora_basename
    if step.tiny:
        tiny.write_lora(lora)
    else:
        realshapes.write_lora(lora, pipe.transformer)
    from qwen_edit_worker.safety import tiny as safety_tiny

    safety_tiny.save(folder / "safety_checker")  # the bake's layout; a tiny checker (its cost is not this step's)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    step.emit("cold_start", build_s=round(built - started, 2), save_s=round(time.perf_counter() - built, 2),
              folder_gb=round(size / 1e9, 3), text_encoder="real width, 1 layer" if not step.tiny else "tiny")
    del pipe
    free()
    step.emit("cold_start", page_cache="kept (tiny model: a CPU check)" if step.tiny else _drop_page_cache())
    worker = Worker({"MODEL_PATH": str(folder), "MODEL_VARIANT": VARIANT, "WARMUP": "0",
                     "ATTENTION_BACKEND": "native"})
    started = time.perf_counter()
    model = editor_of(worker).model
    load_s = time.perf_counter() - started
    step.emit("cold_start", load_s=round(load_s, 2), read_gb_s=round(size / 1e9 / load_s, 2),
              lora_layers=model.lora_layers, loader_seconds=round(model.load_seconds, 2))
    if step.has(20, "first job after the cold start"):
        step.emit("cold_start", first_job_ms=run_job(step, worker, 1.0, first=True)["job_ms"])
    shutil.rmtree(folder, ignore_errors=True)


def _drop_page_cache() -> str:
    """Empty the page cache so the load reads the disk (root only); say what happened."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError as err:
        return f"kept ({type(err).__name__}): the read may come from memory"


# name -> function; the order and the budgets are bench/gpu-session's PLAN (the parent imports no torch).
STEPS: dict[str, Callable[[Step], None]] = {
    "env": env, "warm_jobs": warm_jobs, "attention": attention_backends, "precision": precisions,
    "memory_24gb": memory_24gb, "compile": compiled, "cold_start": cold_start,
}
