"""What the worker serves, as a workflow is checked against it: the one type interpret.py and files.py share.

Why this exists on its own: interpret.py walks a graph and calls files.py for the model and LoRA file
names; both read the deployment.  Kept here, it is imported by both and imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..weights.variants import Variant


@dataclass(frozen=True)
class Deployment:
    """What the worker serves, as far as a graph is checked against it."""

    variant: Variant
    lightning: bool
    lightning_names: tuple[str, ...]  # file names of the fused Lightning LoRA (matched in any case)
    precision: str
    text_encoder_precision: str
    lora_dir: bool  # LORA_DIR is set: a bare lora_name may be a file there
