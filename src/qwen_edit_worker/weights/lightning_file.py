"""The Lightning LoRA file read and checked against the transformer before any weight changes.

Why this exists: the file can be wrong in many ways (missing, a folder, not safetensors, a
truncated header, a pickle renamed, keys that match nothing, keys diffusers' converter refuses
such as `.diff`/`.diff_b`, shapes of another model, only some layers), and each of them fails the
same way on every worker from the same image and settings.  So each is one ModelLoadError naming
the setting (LORA_PATH), which the worker answers to every job while it stays healthy; none may
escape as an unforeseen error of the machine (a CUDA error: serving/worker.py then asks RunPod to
replace the worker), which would have RunPod replace it over and over.  Both load paths use this
one check: the whole-model fuse (lightning.py, through peft) and the block-by-block read
(model/by_block.py, W += B @ A), so they accept the same files, refuse the same files with the
same message, and warn the same way when only some of the file's layers match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .shards import ShardError

log = logging.getLogger(__name__)
DOWN_KEYS = (".lora_down.weight", ".lora_A.weight")
PREFIX = "transformer."
PAIR = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's tensors in diffusers' keys (`transformer.<layer>.lora_A/B.weight`, alpha folded in)."""

    path: Path
    setting: str
    tensors: dict[str, Any]

    def error(self, message: str) -> ModelLoadError:
        return ModelLoadError(self.setting, f"{self.path} {message}")

    def pairs(self, linears: dict[str, tuple[int, int]]) -> dict[str, tuple[Any, Any]]:
        """The file's (down, up) pair for each linear it names, checked against `linears` ({name: (out, in)}).

        A pair whose layer is not a linear of this transformer is unmatched: none matched is an error, some
        unmatched a warning; a pair of the wrong shape for its layer, half a pair or a key that is not a
        LoRA weight is an error.  Nothing has been changed when this raises.
        """
        inside: dict[str, dict[str, Any]] = {}  # the transformer's layers the file names: {layer: {end: tensor}}
        outside: set[str] = set()  # pairs outside `transformer.` (diffusers ignores them): unmatched
        for key, tensor in self.tensors.items():
            end = next((end for end in PAIR if key.endswith(end)), None)
            if end is None:
                raise self.error(f"holds a key the Lightning fuse cannot use ({_short(key)}); expected only "
                                 "lora_A/lora_B (lora_down/lora_up) weights of the transformer's layers")
            if key.startswith(PREFIX):
                inside.setdefault(key[len(PREFIX):-len(end)], {})[end] = tensor
            else:
                outside.add(key[:-len(end)])
        matched = {layer: (ends.get(PAIR[0]), ends.get(PAIR[1])) for layer, ends in inside.items()
                   if layer in linears}
        unmatched = sorted(set(inside) - set(matched) | outside)
        if not matched:
            raise self.error("matched no layer of the transformer: is it the Lightning LoRA for this variant? "
                             f"(e.g. {_short(unmatched[0]) if unmatched else 'no pair at all'})")
        for layer, (down, up) in matched.items():
            _check_pair(self, layer, down, up, linears[layer])
        if unmatched:
            log.warning("Lightning LoRA %s: %d of its %d layers matched the transformer (e.g. %s matched none)",
                        self.path, len(matched), len(matched) + len(unmatched), _short(unmatched[0]))
        return matched


def read(path: Path, setting: str, pipeline_class: Any, values: bool = True) -> LoraFile:
    """Read the LoRA at `path` and convert its keys with diffusers' converter for `pipeline_class`.

    With `values` False the lora_down/lora_up weights are read as meta tensors (their shapes and dtypes from the
    header; the alphas, scalars, are read): the same checks and conversion, nothing held in memory (the streamed
    bake, weights/lora_stream.py, converts each layer's pair when it fuses it).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise ModelLoadError(setting, f"Lightning LoRA file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(setting, f"Lightning LoRA file {path} is not a file (a folder or a device?)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:  # the header alone, before any tensor
            keys = list(handle.keys())  # noqa: SIM118 (safe_open has no iter)
        if not any(key.endswith(DOWN_KEYS) for key in keys):
            raise ModelLoadError(setting, f"{path} holds no LoRA weights (no lora_down/lora_A keys)")
        state = load_file(str(path)) if values else meta_state(path)
    except (SafetensorError, OSError, ValueError, ShardError) as err:
        raise ModelLoadError(setting, f"cannot read {path} as safetensors ({_short(str(err), 160)})") from None
    diff = next((key for key in state if key.endswith((".diff", ".diff_b"))), None)
    if diff is not None:  # full-weight differences: diffusers' Qwen converter refuses them with a plain ValueError
        raise ModelLoadError(setting, f"{path} holds .diff/.diff_b keys (e.g. {_short(diff)}), which diffusers "
                                      "cannot load for this model: use a Lightning LoRA of lora_down/lora_up pairs")
    if any("dora_scale" in key for key in state):
        raise ModelLoadError(setting, f"{path} is a DoRA (dora_scale keys): the Lightning fuse takes a plain LoRA")
    try:
        converted = pipeline_class.lora_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as err:
        # diffusers' Qwen converter raises plain errors on what it cannot pair (a lora_down without its lora_up).
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(setting, f"{path} is not a LoRA diffusers can convert for this model "
                                      f"({_short(detail, 160)})") from None
    return LoraFile(path, setting, converted[0] if isinstance(converted, tuple) else converted)


def meta_state(path: Path, keys: list[str] | None = None) -> dict[str, Any]:
    """The file's tensors (or `keys` of them) as meta tensors of their shapes and dtypes, its alphas (scalars) read."""
    import torch
    from safetensors import safe_open

    from .shards import torch_dtype

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for key in keys if keys is not None else handle.keys():  # noqa: SIM118 (safe_open has no iter)
            if key.endswith(".alpha"):
                out[key] = handle.get_tensor(key)
            else:
                piece = handle.get_slice(key)
                out[key] = torch.empty(piece.get_shape(), dtype=torch_dtype(piece.get_dtype()), device="meta")
    return out


def linear_shapes(transformer: Any) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of every linear layer of `transformer` (real or on the meta device)."""
    import torch

    return {name: (module.out_features, module.in_features) for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear)}


def machine_fault(err: BaseException) -> bool:
    """Whether an error while loading is this machine's (out of GPU memory, a CUDA error), not a file's or setting's.

    Such errors must stay unforeseen (serving/worker.py then asks RunPod to replace the worker), though torch raises
    them as RuntimeError, the type a bad file also raises.
    """
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "CUDA" in str(err)


def _check_pair(lora: LoraFile, layer: str, down: Any, up: Any, shape: tuple[int, int]) -> None:
    if down is None or up is None:
        raise lora.error(f"has half a LoRA pair for {layer} (lora_A/lora_down and lora_B/lora_up go together)")
    out_features, in_features = shape
    if (down.dim() != 2 or up.dim() != 2 or down.shape[1] != in_features or up.shape[0] != out_features
            or up.shape[1] != down.shape[0]):
        raise lora.error(f"does not fit this model's transformer: {layer} is {in_features} -> {out_features}, "
                         f"the LoRA's pair is {list(down.shape)} and {list(up.shape)}")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."
