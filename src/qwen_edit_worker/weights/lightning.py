"""The Lightning LoRA and scheduler: what turns a 40-50 step model into a 3-step one.

Why this exists: the LoRA must really be there.  diffusers loads a file whose keys match no layer
with only a warning and then runs the base model at 3 steps (garbage, silently).  So the file is
read here, loaded, checked against the LoRA layers peft actually created, fused into the
weights (no per-step LoRA cost) and unloaded; any failure is a ModelLoadError naming the file.
The scheduler gets the config of LightX2V's official script (facts.md section 3): for 3 steps
its sigmas are [1.0, 0.857, 0.6, 0].
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

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


def read_lora(path: Path, setting: str = "LORA_PATH") -> dict[str, Any]:
    """Read a LoRA safetensors file; a missing or unreadable file is a ModelLoadError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelLoadError(setting, f"Lightning LoRA file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(setting, f"cannot read {path} as safetensors ({err})") from None
    if not any(key.endswith((".lora_down.weight", ".lora_A.weight")) for key in state):
        raise ModelLoadError(setting, f"{path} holds no LoRA weights (no lora_down/lora_A keys)")
    return state


def fuse_lightning(pipe: Any, path: Path, setting: str = "LORA_PATH") -> int:
    """Load, check, fuse and unload the LoRA at `path`; return the number of layers it changed."""
    state = read_lora(path, setting)
    expected = sum(key.endswith((".lora_down.weight", ".lora_A.weight")) for key in state)
    try:
        pipe.load_lora_weights(state, adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ModelLoadError(setting, f"{path} does not fit this model's transformer ({detail})") from None
    matched = _lora_layers(pipe.transformer)
    if ADAPTER not in pipe.get_list_adapters().get("transformer", []) or matched == 0:
        pipe.unload_lora_weights()
        raise ModelLoadError(
            setting, f"{path} matched no layer of the transformer: is it the Lightning LoRA for this variant?"
        )
    if matched < expected:
        log.warning("Lightning LoRA %s: %d of its %d layers matched the transformer", path, matched, expected)
    pipe.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    pipe.unload_lora_weights()
    log.info("Lightning LoRA %s fused into %d layers and unloaded", path.name, matched)
    return matched


def _lora_layers(transformer: Any) -> int:
    return sum(1 for module in transformer.modules() if ADAPTER in getattr(module, "lora_A", {}))
