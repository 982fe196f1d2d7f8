"""Which models take request LoRAs (PRECISION, COMPILE): the decision, made before any download.

Why this exists: request LoRAs are PEFT adapters on top of the (possibly quantised) linear
layers, unmerged, so what matters is whether peft wraps a quantised layer.  peft 0.21
(`tuners/lora/torchao.py`) wraps any torchao tensor subclass (`TorchAOBaseTensor`) in a
`TorchaoLoraLinear`, whose forward adds the adapter's output to the quantised layer's; it
refuses only `Int4Tensor`.  So bf16, int8 (`Int8Tensor`, checked end to end on the CPU) and fp8
(`Float8Tensor`, checked at the layer level on the CPU: tests/test_loras_model.py) all take
adapters.  A precision not in this table (a future int4) is refused with an error naming
PRECISION, before the job downloads anything.

COMPILE=regional does not take them (measured on the tiny model, torch 2.14 on a CPU): every new
adapter, every new scale and every new set of active adapters changes what the compiled blocks
guard on, so the job recompiles them (a job went from 0.16 s to 22.5 s for a new LoRA and 17 s
for a new scale), and after 8 recompilations torch.compile refuses the block (`recompile_limit`,
with fullgraph=True a failed job).  Diffusers' hotswap (fixed, rank-padded adapter slots with
tensor scales) could avoid that; until it is built and measured, a LoRA job under
COMPILE=regional is an error naming COMPILE.  Pure: no torch.
"""

from __future__ import annotations

# PRECISION -> the weight type peft sees on the transformer's linear layers.
ADAPTER_BASES = {"bf16": "torch.Tensor", "int8": "torchao Int8Tensor", "fp8": "torchao Float8Tensor"}


def adapter_problem(precision: str) -> str | None:
    """Why jobs cannot add LoRAs to a transformer at `precision`, or None when they can."""
    if precision in ADAPTER_BASES:
        return None
    allowed = ", ".join(ADAPTER_BASES)
    return f"request LoRAs need PRECISION {allowed} (peft puts no LoRA on {precision} layers); this worker runs " \
           f"{precision}"


def compile_problem(compile_mode: str) -> str | None:
    """Why jobs cannot add LoRAs under COMPILE=`compile_mode`, or None when they can."""
    if compile_mode == "off":
        return None
    return (f"request LoRAs need COMPILE=off; this worker runs COMPILE={compile_mode}, where each new LoRA, scale "
            "or set would recompile the transformer blocks (seconds to minutes) until torch.compile gives up")
