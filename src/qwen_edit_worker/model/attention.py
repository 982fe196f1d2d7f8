"""Choosing the attention backend: measured on this GPU at load, not guessed.

Why this exists: which attention kernel is fastest depends on the GPU, the torch build and which
packages really run (an xformers wheel built against another CUDA runtime imports and then fails;
flash-attn may be absent), so `ATTENTION_BACKEND=auto` times every backend that works here on the
model's real attention shape (24 heads of 128, the 1 MP sequence length, bf16) for a fraction of a
second each, picks the fastest, and logs every timing; the choice and the timings go into each
job's `model` block.  An explicit backend is used as given, after one small real call proves it
runs (an explicit backend that cannot run is a load error naming it).

Backends go through diffusers' attention dispatcher by name (facts.md section 4): `native` is
torch SDPA letting torch pick its kernel; `_native_cudnn`, `_native_flash` and `_native_efficient`
pin one SDPA kernel; `xformers` and `flash` need their packages.  The measuring function is
injected, so the choice logic is tested on a CPU with given timings.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError
from ..weights.variants import Variant

log = logging.getLogger(__name__)

# Timed by `auto`, in order of preference when two are equally fast (native first: no extra package).
CANDIDATES = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "xformers", "flash")
PACKAGES = {"xformers": "xformers", "flash": "flash_attn"}
HEADS, HEAD_DIM = 24, 128  # Qwen-Image's transformer: width 3072
IMAGE_TOKENS_1MP = 4096  # 1024x1024 px / (8 px VAE factor * 2x2 patches)
TEXT_TOKENS_1MP = {"QwenImageEditPipeline": 1407, "QwenImageEditPlusPipeline": 258}  # bench/gpu --dry-run
BUDGET_SECONDS = 0.15  # per backend: a fraction of a second, so a cold start barely notices
TIE = 0.02  # within 2% of the fastest counts as equally fast; the earlier candidate wins

Measure = Callable[[str], float]  # backend -> milliseconds per attention call; raises if it cannot run


@dataclass(frozen=True)
class AttentionChoice:
    """The backend the transformer uses, how it was chosen, and what was measured."""

    backend: str
    how: str  # "explicit", "auto: fastest measured", "auto: no CUDA device"
    timings_ms: dict[str, float] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)


def sequence_length(variant: Variant) -> int:
    """Tokens in one transformer pass at 1 MP: output + condition image tokens + text tokens."""
    return 2 * IMAGE_TOKENS_1MP + TEXT_TOKENS_1MP[variant.pipeline_class]


def choose(setting: str, cuda: bool, measure: Measure | None) -> AttentionChoice:
    """The backend for ATTENTION_BACKEND=`setting`; `measure` times one backend on this GPU."""
    if setting != "auto":
        problem = _cannot_run(setting, cuda, measure)
        if problem:
            raise ModelLoadError("ATTENTION_BACKEND", f"{setting} cannot run here ({problem}); use auto or native")
        log.info("attention backend: %s (explicit)", setting)
        return AttentionChoice(setting, "explicit")
    if not cuda or measure is None:
        log.info("attention backend: native (auto; no CUDA device, so nothing to compare)")
        return AttentionChoice("native", "auto: no CUDA device")
    timings: dict[str, float] = {}
    unusable: dict[str, str] = {}
    for name in CANDIDATES:
        missing = _missing_package(name)
        if missing:
            unusable[name] = missing
            continue
        try:
            timings[name] = round(measure(name), 3)
        except Exception as err:  # any failure means this backend does not run here; say why and go on
            unusable[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    if not timings:
        raise ModelLoadError("ATTENTION_BACKEND", f"no attention backend ran on this GPU ({unusable})")
    backend = pick_fastest(timings)
    log.info("attention backend: %s (auto; ms per attention call at the 1 MP shape: %s; unusable: %s)", backend,
             ", ".join(f"{k}={v:.3f}" for k, v in sorted(timings.items(), key=lambda kv: kv[1])),
             "; ".join(f"{k} ({v})" for k, v in unusable.items()) or "none")
    return AttentionChoice(backend, "auto: fastest measured", timings, unusable)


def pick_fastest(timings: Mapping[str, float]) -> str:
    """The fastest backend; within TIE of it, the earliest in CANDIDATES (fewest moving parts)."""
    best = min(timings.values())
    close = [name for name, ms in timings.items() if ms <= best * (1 + TIE)]
    return min(close, key=lambda name: CANDIDATES.index(name) if name in CANDIDATES else len(CANDIDATES))


def _missing_package(name: str) -> str | None:
    package = PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        return f"the {package} package is not installed"
    return None


def _cannot_run(name: str, cuda: bool, measure: Measure | None) -> str | None:
    """Why an explicitly chosen backend cannot run, or None (native always runs)."""
    if name == "native":
        return None
    if not cuda:
        return "no CUDA device"
    missing = _missing_package(name)
    if missing:
        return missing
    if measure is not None:
        try:
            measure(name)
        except Exception as err:  # a real call failed: the backend is unusable here
            return f"its attention call failed on this GPU: {type(err).__name__}: {str(err)[:200]}"
    return None


def measurer(seq_len: int, device: str = "cuda", dtype: Any = None, budget: float = BUDGET_SECONDS) -> Measure:
    """A Measure that runs diffusers' dispatcher on random (1, seq_len, 24, 128) q/k/v.

    One untimed call first (it raises if the backend cannot run, and pays any one-off set-up),
    then calls in batches of three until `budget` seconds; the best batch's mean is returned, each
    batch synchronised on the GPU so queued work is counted.
    """
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName as Name
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements, dispatch_attention_fn

    dtype = dtype or torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, HEADS, HEAD_DIM, device=device, dtype=dtype, generator=generator)
               for _ in range(3))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def measure(name: str) -> float:
        backend = Name(name)
        _check_attention_backend_requirements(backend)
        with torch.inference_mode():
            dispatch_attention_fn(q, k, v, backend=backend)
            sync()
            best = float("inf")
            deadline = time.perf_counter() + budget
            while True:
                started = time.perf_counter()
                for _ in range(3):
                    dispatch_attention_fn(q, k, v, backend=backend)
                sync()
                best = min(best, (time.perf_counter() - started) / 3)
                if time.perf_counter() > deadline:
                    return best * 1000

    return measure


def apply(transformer: Any, backend: str) -> None:
    """Route every attention module of the transformer through `backend`."""
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as err:
        raise ModelLoadError("ATTENTION_BACKEND", f"{backend} failed to start: {err}") from None
