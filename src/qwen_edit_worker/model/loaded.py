"""A loaded model: the ready pipeline and the facts about it that every job reports; what a load tells as it goes.

Why this exists: the load sequence (model/sequence.py) ends in one of these, and the engine, the
worker and the benchmarks only need this type, not the sequence that made it (nor its imports:
this module imports no torch, so serving/worker.py can listen to a load with LoadEvents).  It records exactly
what took effect (device, dtype, attention backend, memory savers, LoRA layers, precision, placement)
for the load log and each job's `model` block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import placement, safety
from ..settings import Settings
from . import attention


@dataclass
class LoadedModel:
    """A ready pipeline and the facts about it that jobs report."""

    pipe: Any
    settings: Settings
    device: str
    dtype: str
    gpu_name: str | None
    attention: attention.AttentionChoice
    memory_saving: list[str]
    source: str
    lora_layers: int
    # Benchmarks that build a LoadedModel by hand get the CPU plan; load_model always passes the real one.
    placement: placement.Plan = field(default_factory=lambda: placement.plan({}, None))
    manifest: dict[str, str] | None = None
    lightning_fused: str | None = None  # where the Lightning LoRA was fused: "bake", "load", or None (base model)
    quantised: dict[str, Any] = field(default_factory=dict)  # component -> where and how long, when done at load
    load_seconds: float = 0.0
    safety: safety.Checker | None = None  # SAFETY_CHECKER off: None

    def info(self, steps: int) -> dict[str, Any]:
        """The job output's `model` block."""
        return {
            "variant": self.settings.variant.name,
            "lightning": self.settings.lightning,
            "steps": steps,
            "attention_backend": self.attention.backend,
            "attention_choice": self.attention.how,
            "attention_ms": dict(self.attention.timings_ms),
            "memory_saving": list(self.memory_saving),
            "offload": self.placement.offload,
            "placement": self.placement.info(),
            "precision": self.settings.precision,
            "text_encoder_precision": self.settings.text_encoder_precision,
            "lightning_fused": self.lightning_fused,
            "quantised_at_load": dict(self.quantised),
            "compile": self.settings.compile,
            "dtype": self.dtype,
            "device": self.device,
            "source": self.source,
            "manifest": self.manifest,
            "safety_checker": None if self.safety is None else self.safety.info(),
        }


class LoadEvents:
    """What the load tells its caller as it goes; the defaults do nothing (serving/worker.py listens)."""

    def read(self, folders: tuple[str, ...], device: str) -> None:
        """The files of these folders of the model are in memory, on `device`: they will not be read again."""

    def text_ready(self, pipe: Any) -> None:
        """`pipe` (its transformer may still be missing) can encode prompts where it will run them."""
