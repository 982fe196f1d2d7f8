"""Which models take request LoRAs (PRECISION, COMPILE): the decision, made before any download.

Why this exists: request LoRAs are PEFT adapters on top of the (possibly quantised) linear
layers, unmerged, so what matters is whether peft wraps a quantised layer.  peft 0.21
(`tuners/lora/torchao.py`) wraps any torchao tensor subclass (`TorchAOBaseTensor`) in a
`TorchaoLoraLinear`, whose forward adds the adapter's output to the quantised layer's; it
refuses only `Int4Tensor`.  So bf16, int8 (`Int8Tensor`, checked end to end on the CPU) and fp8
(`Float8Tensor`, checked at the layer level on the CPU: tests/test_loras_model.py) all take
adapters.  A precision not in this table (a future int4) is refused with an error naming
PRECISION, before the job downloads anything.

COMPILE=regional takes them through fixed, rank-padded slots made at load (loras/hotswap.py),
unless LORA_MAX_RANK is 0 (then no slots are made, and a LoRA job is an error naming it).  The
plain slots would recompile the compiled blocks for every new LoRA, scale or set (measured on the
tiny model: 17-22 s a job, and torch.compile gave up after 8 recompilations).  Pure: no torch.
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


def compile_problem(compile_mode: str, max_rank: int) -> str | None:
    """Why jobs cannot add LoRAs under COMPILE=`compile_mode` with LORA_MAX_RANK=`max_rank`, or None."""
    if compile_mode == "off" or max_rank > 0:
        return None
    return (f"request LoRAs on a COMPILE={compile_mode} worker need LORA_MAX_RANK above 0 (its LoRA slots are made "
            "at load); this worker has LORA_MAX_RANK=0")
