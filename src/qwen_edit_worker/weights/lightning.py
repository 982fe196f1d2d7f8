"""The Lightning LoRA and scheduler: what turns a 40-50 step model into a 3-step one.

Why this exists: the LoRA must really be there.  diffusers loads a file whose keys match no layer
with only a warning and then runs the base model at 3 steps (garbage, silently).  So the file is
read and checked against the transformer's layers (lightning_file.py) and fused into the weights
(no per-step LoRA cost), W += B @ A layer by layer; any failure is a ModelLoadError naming the
setting and the file.
The scheduler gets the config of LightX2V's official script (facts.md section 3): for 3 steps
its sigmas are [1.0, 0.857, 0.6, 0].
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from . import lightning_file

log = logging.getLogger(__name__)

SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def lightning_scheduler(base_scheduler: Any) -> Any:
    """A FlowMatchEulerDiscreteScheduler with the Lightning config over the base one's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config({**base_scheduler.config, **SCHEDULER_CONFIG})


def fuse_lightning(pipe: Any, path: Path, setting: str = "LORA_PATH") -> int:
    """Read and check the LoRA at `path`, and fuse it into the transformer; return the number of layers changed.

    The file is checked against the transformer first (lightning_file.py: the same check as the block-by-block
    path), and the pairs that match are fused in place (`fuse_pairs`), so both paths fuse the same layers.
    """
    lora = lightning_file.read(path, setting, type(pipe))
    pairs = lora.pairs(lightning_file.linear_shapes(pipe.transformer))
    fused = fuse_pairs(pipe.transformer, pairs)
    log.info("Lightning LoRA %s fused into %d layers", path.name, fused)
    return fused


def fuse_pairs(model: Any, pairs: dict[str, tuple[Any, Any]], layers: set[str] | None = None) -> int:
    """W += up @ down for each linear of `model` a (down, up) pair names (alpha folded in by diffusers' own key
    conversion: lightning_file.py), only those in `layers` when given; the number of layers changed.

    One fused multiply-add in the weight's dtype on its device (fp32 accumulation): the delta peft's
    `fuse_lora` adds, without building adapters to unload again.  On a GPU in place (no second copy of the
    layer).  On a CPU into a new tensor: weights loaded there stay backed by the safetensors file's mapping,
    and writing into them in place faults in a private copy page by page (0.32 s for a 12288 x 3072 bf16
    layer, measured here, against 0.05 s out of place; peft's path took ~0.37 s).
    """
    import torch

    changed = 0
    with torch.no_grad():
        for name in pairs.keys() if layers is None else pairs.keys() & layers:
            down, up = pairs[name]
            weight = model.get_submodule(name).weight
            if weight.device.type == "cpu":
                weight.data = fused(weight, down, up)
            else:
                weight.addmm_(up.to(weight.device, weight.dtype), down.to(weight.device, weight.dtype))
            changed += 1
    return changed


def fused(weight: Any, down: Any, up: Any) -> Any:
    """A new tensor W + up @ down, in W's dtype on W's device: the CPU fuse of `fuse_pairs`, which the streamed
    bake (weights/stream.py) calls tensor by tensor, so both bakes make the same bits."""
    import torch

    with torch.no_grad():
        return torch.addmm(weight, up.to(weight.device, weight.dtype), down.to(weight.device, weight.dtype))
