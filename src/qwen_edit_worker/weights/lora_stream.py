"""The Lightning LoRA for the streamed bake: checked whole without its values, each layer's pair made when fused.

Why this exists: the real Lightning file is about 1.2 GB (rank 64 over 60 blocks), and diffusers'
conversion (alpha folded into new tensors) would hold all of it in memory from the start of the
transformer to its last shard: memory that grows with the model.  So the file is checked exactly as
the worker checks it (lightning_file.read and LoraFile.pairs: the same errors, the same warning),
but on meta tensors (shapes and dtypes from the header, the alphas read); and each layer's pair is
converted by the same diffusers converter, from that layer's own keys read from the mapped file,
only when the streamed bake fuses it, then dropped.  The converter works key by key (each module's
down, up and alpha; the alpha folded into that module's tensors), so a layer converted alone is the
same bits as in the whole file's conversion (tests/test_stream.py compares the fused weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import lightning_file
from .errors import ModelLoadError

ENDS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")


class LayerPairs:
    """{layer: (down, up)} of a checked LoRA file, each pair read and converted when it is popped."""

    def __init__(self, path: Path, setting: str, pipeline_class: Any, linears: dict[str, tuple[int, int]]) -> None:
        from safetensors import safe_open

        self.path, self.pipeline_class = path, pipeline_class
        checked = lightning_file.read(path, setting, pipeline_class, values=False)
        matched = checked.pairs(linears)  # raises ModelLoadError naming `setting` as the worker's check does
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())  # noqa: SIM118 (safe_open has no iter)
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(next((key[: -len(end)] for end in ENDS if key.endswith(end)), key), []).append(key)
        self.groups: dict[str, list[str]] = {}  # the layer (converted name) each module's keys become
        for group in groups.values():
            state = lightning_file.meta_state(path, group)
            for name in _converted(pipeline_class, state):
                layer = name.removeprefix(lightning_file.PREFIX).rsplit(".lora_", 1)[0]
                if layer in matched:
                    self.groups[layer] = group
        missing = sorted(set(matched) - set(self.groups))
        if missing:  # the file converted whole matched layers its modules did not convert to one by one
            raise ModelLoadError(setting, f"{path}: {missing[0]} is not made by its own keys alone (diffusers' "
                                          "converter read the file as a whole differently)")

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def pop(self, layer: str, default: Any = None) -> Any:
        """(down, up) of `layer`, converted now from its keys in the file, and forgotten; `default` if not a pair."""
        from safetensors import safe_open

        group = self.groups.pop(layer, None)
        if group is None:
            return default
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            state = {key: handle.get_tensor(key) for key in group}
        converted = _converted(self.pipeline_class, state)
        prefix = f"{lightning_file.PREFIX}{layer}"
        return converted[f"{prefix}{lightning_file.PAIR[0]}"], converted[f"{prefix}{lightning_file.PAIR[1]}"]


def _converted(pipeline_class: Any, state: dict[str, Any]) -> dict[str, Any]:
    converted = pipeline_class.lora_state_dict(state)
    return converted[0] if isinstance(converted, tuple) else converted
