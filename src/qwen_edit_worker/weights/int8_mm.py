"""torchao's int8 matmul without its host synchronisation: what every int8 linear calls on the GPU.

Why this exists: torchao 0.18's int8 dynamic-activation linear (Int8Tensor, the layout of
precision.py's `Int8DynamicActivationInt8WeightConfig`) ends in `kernel/intmm.py: int_scaled_matmul`,
which on CUDA calls `safe_int_mm`, and that evaluates `"FakeTensor" in input.__repr__()` on every
eager call to detect fake tensors.  Formatting a CUDA tensor copies it to the host and waits for the
GPU: once in every int8 linear (846 in the transformer, every step), on the path the 24 and 48 GB
presets run (int8, eager, COMPILE=off).  Its CPU path (`_int_scaled_matmul_cpu`) never formats, so
CPU tests never saw it (facts.md section 11).

`install` points Int8Tensor's linear at `int_scaled_matmul` below, which computes the same
numbers without the check: `torch._int_mm` (cuBLAS on CUDA, the same kernel torchao reaches through
`out_dtype`), int32 times the float32 row scales; where cuBLAS refuses a shape (few rows: the
modulation layers at batch 1) the float32 product torchao falls back to; where torchao would copy to
the host for an int32 product (sizes not a multiple of 8, never in the real model) an exact float64
product on the device.  Under torch.compile (COMPILE=regional) torchao's own function runs (its
compile branch never formats).  The loader installs it before any model is built.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
TARGET = "torchao.quantization.quantize_.workflows.int8.int8_tensor"  # where Int8Tensor's linear finds it
_original: Any = None


def int_scaled_matmul(a: Any, b: Any, scales1: Any) -> Any:
    """(a @ b) * scales1 for int8 `a` (M x K) and `b` (K x N), float32 row scales (M x 1); no host sync."""
    import torch

    if torch.compiler.is_compiling():
        return _original(a, b, scales1)
    assert scales1.dim() == 2 and scales1.size(1) == 1 and (scales1.size(0) == a.size(0) or scales1.numel() == 1)
    return int_mm(a, b).to(scales1.dtype) * scales1


def int_mm(a: Any, b: Any) -> Any:
    """The exact int32 product of int8 matrices, on their device, without reading anything back to the host."""
    import torch

    if a.device.type != "cuda":
        return torch._int_mm(a, b)  # a CPU kernel exists; torchao's CPU path calls the same
    rows, inner = a.shape
    if inner % 8 or b.shape[1] % 8:  # cuBLAS int8 needs multiples of 8; torchao copies to the host here
        return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)  # exact below 2**53
    b = b if b.is_contiguous() else b.contiguous()  # as torchao: cuBLAS gives wrong results otherwise
    a = a if a.is_contiguous() or rows % 8 == 0 else a.contiguous()
    try:
        return torch._int_mm(a, b)
    except RuntimeError:  # cuBLAS refuses the shape (a few rows): torchao's own fallback, the same numbers
        return torch.matmul(a.to(torch.float32), b.to(torch.float32)).to(torch.int32)


def install() -> bool:
    """Make torchao's int8 linear use `int_scaled_matmul`; idempotent.  False (logged) if torchao moved it."""
    global _original
    import importlib

    module = importlib.import_module(TARGET)
    current = getattr(module, "int_scaled_matmul", None)
    if current is int_scaled_matmul:
        return True
    from torchao.kernel import intmm

    if current is not intmm.int_scaled_matmul:
        log.warning("int8: torchao's Int8Tensor no longer calls kernel.intmm.int_scaled_matmul; its matmul is left "
                    "as it is (it may read each activation back to the host)")
        return False
    _original = current
    module.int_scaled_matmul = int_scaled_matmul
    return True


def installed() -> bool:
    import importlib

    return getattr(importlib.import_module(TARGET), "int_scaled_matmul", None) is int_scaled_matmul
