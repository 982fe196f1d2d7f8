"""Which transformer precisions take request LoRAs: the decision, made before any download.

Why this exists: request LoRAs are PEFT adapters on top of the (possibly quantised) linear
layers, unmerged, so what matters is whether peft wraps a quantised layer.  peft 0.21
(`tuners/lora/torchao.py`) wraps any torchao tensor subclass (`TorchAOBaseTensor`) in a
`TorchaoLoraLinear`, whose forward adds the adapter's output to the quantised layer's; it
refuses only `Int4Tensor`.  So bf16, int8 (`Int8Tensor`, checked end to end on the CPU) and fp8
(`Float8Tensor`, checked at the layer level on the CPU: tests/test_loras_model.py) all take
adapters.  A precision not in this table (a future int4) is refused with an error naming
PRECISION, before the job downloads anything.  Pure: no torch.
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
