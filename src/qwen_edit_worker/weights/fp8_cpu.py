"""fp8 weights made on the build machine's CPU, by torchao's own quantisation code.

Why this exists: an fp8 bake stores the transformer at ~20.5 GB and the text encoder at ~9.5 GB,
so the fp8 classes read ~30 GB at start instead of 58; but torchao 0.18 creates its fp8 weights
only where it sees an Ada or Hopper GPU, and a Docker build has none.  Nothing in the quantisation
itself needs one.  torchao 0.18's handler for `Float8DynamicActivationFloat8WeightConfig`
(quantization/quant_api.py) asks `torch.cuda.is_available()` and the compute capability
(`_check_hardware_support`, `is_sm_at_least_89`) and then calls `Float8Tensor.from_hp`, whose
torch path (`_choose_scale_float8`: each row's amax / 448 in the weight's bf16, kept as float32;
`_quantize_affine_float8`: the float32 division, clamp and float8_e4m3fn cast) runs on CPU tensors.

So, while `answered()` is active, torchao's registered fp8 handler is wrapped: for a weight on the
CPU (or on the meta device, where the streamed bake plans types and shapes and nothing is computed)
it runs with the hardware question answered (CUDA available, capability 8.9, a CUDA build) for
the length of that one call; a weight on any other device gets torchao's handler untouched, and
outside the block nothing is answered at all (as placement/fakecuda.py answers it only inside the
quantise call of a fake run).  Why the answer changes nothing that is stored (torchao 0.18 source):
- kernel: `from_hp` leaves its torch path only for mslk's triton `quantize_fp8_row`, with mslk
  installed and sm90+.  The answer is 8.9, so the torch path runs even where mslk is installed;
  the worker's image installs no mslk (builder/requirements.txt), so an Ada or Hopper GPU
  quantising at load takes the same torch path.
- recorded attributes: `kernel_preference` is stored as configured (AUTO), never the kernel chosen;
  `mm_config` (use_fast_accum=True) is set by the config from `torch.xpu` alone; `block_size`
  ([1, in_features]), `act_quant_kwargs` and the dtype (bf16) do not depend on the device.
- arithmetic: a CUDA GPU divides by a Python scalar as a multiplication by its float32 reciprocal
  (ATen's BinaryDivTrueKernel.cu), the CPU divides; for amax / 448 rounded to bf16 the two agree
  for every bf16 value (tests/test_fp8_bake.py tries all of them).  The weight divided by its scale
  is a float32 tensor by a tensor on both (IEEE division), and the float8 cast is c10's
  round-to-nearest-even conversion on a GPU; the CPU's (possibly vectorised) cast gives the same at
  every rounding boundary (tested).  That a GPU's kernels do so is read from the source, not run here.
Checked against torchao `CHECKED_TORCHAO` only: another version is refused until checked again.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

CHECKED_TORCHAO = "0.18.0"  # the version whose fp8 code path the module docstring describes (the image's pin)
ANSWERED_CAPABILITY = (8, 9)  # Ada: keeps torchao on its torch kernels (its mslk path wants sm90)
ANSWERED_DEVICES = ("cpu", "meta")  # meta: the streamed bake's plan (weights/stream_plan.py)
HARDWARE_CHECK = "answered as sm89 inside torchao's fp8 quantise call only (no GPU on the build machine)"


def unsupported() -> str | None:
    """Why fp8 cannot be made on this machine's CPU, or None when it can."""
    import torchao

    if torchao.__version__ != CHECKED_TORCHAO:
        return (f"fp8 weights are made on the CPU with torchao {CHECKED_TORCHAO}'s own code, checked for that "
                f"version only (weights/fp8_cpu.py); this build has torchao {torchao.__version__}: pin "
                f"torchao=={CHECKED_TORCHAO} or check the new version's fp8 path and update CHECKED_TORCHAO")
    return None


@contextmanager
def answered() -> Iterator[None]:
    """While active, torchao's fp8 handler quantises CPU weights with its hardware question answered."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    config_type = Float8DynamicActivationFloat8WeightConfig
    original = _QUANTIZE_CONFIG_HANDLER[config_type]
    _QUANTIZE_CONFIG_HANDLER[config_type] = _answering(original)
    try:
        yield
    finally:
        _QUANTIZE_CONFIG_HANDLER[config_type] = original


def _answering(handler: Any) -> Any:
    """`handler` with the hardware question answered while it quantises a weight held on the CPU (or meta)."""

    @functools.wraps(handler)  # the same signature: torchao inspects it for `parameter_name`
    def quantise_on_cpu(module: Any, config: Any, *, parameter_name: str = "weight") -> Any:
        weight = getattr(module, parameter_name, None)
        if weight is None or weight.device.type not in ANSWERED_DEVICES:
            return handler(module, config, parameter_name=parameter_name)
        with _ada():
            return handler(module, config, parameter_name=parameter_name)

    return quantise_on_cpu


@contextmanager
def _ada() -> Iterator[None]:
    """torch reports a CUDA build with an sm89 GPU: what torchao's fp8 hardware check reads."""
    import torch

    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: ANSWERED_CAPABILITY), \
            mock.patch.object(torch.version, "cuda", torch.version.cuda or "12.8"):  # a CPU-only torch has none
        yield
