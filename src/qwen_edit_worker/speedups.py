"""Precision and compilation: the two settings that make each step cheaper on a GPU.

Why this exists: a 3-step edit on an H100 is dominated by three transformer passes (~167 TFLOP
each at 1 MP), so the transformer's arithmetic is where cost goes.
- PRECISION=fp8 quantises the transformer's linear layers to float8 (torchao: dynamic activation,
  per-row weight scales), doubling the matrix units' peak on Ada and Hopper GPUs.  It runs after
  the Lightning LoRA is fused: a bf16 LoRA on an fp8 base gave grid artifacts upstream.
- COMPILE=regional compiles the transformer's repeated block once (diffusers'
  `compile_repeated_blocks`) and warms it up during loading, so no job pays for compilation.
  A job at a new size recompiles once (seconds on a GPU), so it suits endpoints with few sizes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)
FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm89) and Hopper (sm90) have float8 matrix units


def check_precision(precision: str, cuda: bool, capability: tuple[int, int] | None) -> None:
    """PRECISION=fp8 needs a CUDA GPU with float8 matrix units: anything else is a load error."""
    if precision != "fp8":
        return
    if not cuda or capability is None:
        raise ModelLoadError("PRECISION", "fp8 needs a CUDA GPU with float8 units (Ada or Hopper); use bf16")
    if capability < FP8_MIN_CAPABILITY:
        raise ModelLoadError("PRECISION", f"fp8 needs compute capability 8.9 or newer (Ada, Hopper); this GPU is "
                                          f"{capability[0]}.{capability[1]}; use bf16")


def quantize_fp8(transformer: Any) -> None:
    """Quantise the transformer's linear layers to float8 in place (after the LoRA is fused)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    started = time.perf_counter()
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    log.info("precision: transformer quantised to fp8 in %.1f s", time.perf_counter() - started)


def compile_regional(transformer: Any) -> None:
    """Compile the repeated transformer block (the first call afterwards compiles for real)."""
    transformer.compile_repeated_blocks(fullgraph=True)


def warm_up(run_edit: Any, size: tuple[int, int]) -> float:
    """Run one throw-away edit at `size` so compilation happens now, not in a job; return seconds."""
    started = time.perf_counter()
    run_edit(size)
    seconds = time.perf_counter() - started
    log.info("compile: warmed up at %dx%d in %.1f s", size[0], size[1], seconds)
    return seconds
