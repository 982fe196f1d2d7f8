"""The Lightning LoRA and scheduler: what turns a 40-50 step model into a 3-step one.

Why this exists: the LoRA must really be there.  diffusers loads a file whose keys match no layer
with only a warning and then runs the base model at 3 steps (garbage, silently).  So the file is
read and checked against the transformer's layers (lightning_file.py), loaded, checked against
the LoRA layers peft actually created, fused into the weights (no per-step LoRA cost) and
unloaded; any failure is a ModelLoadError naming the setting and the file.
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
ADAPTER = "lightning"

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
    """Read, check, load, fuse and unload the LoRA at `path`; return the number of layers it changed.

    The file is checked against the transformer first (lightning_file.py: the same check as the block-by-block
    path), and peft is given only the pairs that match, so both paths fuse the same layers.
    """
    lora = lightning_file.read(path, setting, type(pipe))
    pairs = lora.pairs(lightning_file.linear_shapes(pipe.transformer))
    state = {f"{lightning_file.PREFIX}{layer}{end}": tensor for layer, pair in pairs.items()
             for end, tensor in zip(lightning_file.PAIR, pair, strict=True)}
    try:
        pipe.load_lora_weights(state, adapter_name=ADAPTER)
    except (ValueError, KeyError, TypeError, RuntimeError) as err:  # checked above; kept for a peft that disagrees
        if lightning_file.machine_fault(err):
            raise  # running out of GPU memory, a CUDA error: this machine's, not the file's
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise lora.error(f"does not fit this model's transformer ({detail})") from None
    matched = _lora_layers(pipe.transformer)
    if ADAPTER not in pipe.get_list_adapters().get("transformer", []) or matched != len(pairs):
        pipe.unload_lora_weights()
        raise lora.error(f"loaded into {matched} layers of the transformer where {len(pairs)} match: is it the "
                         "Lightning LoRA for this variant?")
    pipe.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    pipe.unload_lora_weights()
    log.info("Lightning LoRA %s fused into %d layers and unloaded", path.name, matched)
    return matched


def _lora_layers(transformer: Any) -> int:
    return sum(1 for module in transformer.modules() if ADAPTER in getattr(module, "lora_A", {}))
