"""What the streamed bake will store for one component, decided before any weight is read.

Why this exists: the stored folder must be what today's whole-model bake stores (`from_pretrained`
with a TorchAoConfig, then `save_pretrained`), and every safetensors shard carries in its header
the torchao metadata of the whole component (diffusers and transformers write all of it into
every shard, and read it back merged).  None of that depends on the weights' values, so it is
worked out here on the component's skeleton (weights/skeleton.py): the library chooses the layers
to quantise, each of them is quantised on the meta device with the same torchao configuration,
and the libraries' own `get_state_dict_and_metadata` (torchao's `flatten_tensor_state_dict`)
and name reversion give the stored names, dtypes, shapes and metadata.  The plan then says, for
each tensor stored in the input, which output tensors it becomes; weights/stream.py makes them
(and checks that what it made is what was planned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fp8_cpu
from .skeleton import Skeleton, SkeletonError

GRANULARITIES = {"PerRow": "per-row", "PerTensor": "per-tensor"}  # torchao's classes, as the manifest names them


@dataclass(frozen=True)
class Piece:
    """One stored output tensor: a plain tensor (`part` None) or one data tensor of a torchao weight."""

    name: str
    dtype: Any
    shape: tuple[int, ...]
    part: str | None = None


@dataclass(frozen=True)
class Entry:
    """One input tensor: its state-dict name, what it is read as, whether it is quantised, what it becomes."""

    loaded: str
    dtype: Any  # the dtype from_pretrained casts it to (its own when not floating point)
    shape: tuple[int, ...]
    quantised: bool
    pieces: tuple[Piece, ...]  # empty: left out of the files (a tied weight)
    tensor_json: str | None  # torchao's metadata of the quantised weight (what the made one must match)


class Plan:
    """The stored layout of one component: entries by input name, the shard header metadata, the index."""

    def __init__(self, skeleton: Skeleton, stored: list[str], value: str, read_dtype: Any) -> None:
        import torch

        self.skeleton, self.value, self.read_dtype = skeleton, value, read_dtype
        self.config = skeleton.quantizer.quantization_config.get_apply_tensor_subclass() if skeleton.quantizer \
            else None
        loaded = skeleton.loaded_names(stored)
        meta = skeleton.state_dict()
        strangers = [name for name in stored if loaded[name] not in meta]
        if strangers:
            raise SkeletonError(f"{skeleton.component.name}: {strangers[0]} is stored but is no weight of "
                                f"{type(skeleton.model).__name__} ({len(strangers)} such)")
        missing = sorted(set(meta) - set(loaded.values()))
        if missing:
            raise SkeletonError(f"{skeleton.component.name}: {missing[0]} is a weight of the model that no file "
                                f"holds ({len(missing)} missing): is the download whole?")
        chosen = [name for name in meta if skeleton.chooses(name)]
        if chosen:
            from torchao.quantization import quantize_

            with fp8_cpu.answered():  # on the meta device: nothing is computed, the types and shapes are made
                for name in chosen:
                    quantize_(skeleton.model.get_submodule(name.rsplit(".", 1)[0]), self.config)
        state = skeleton.state_dict()
        quantised = {name for name in chosen if _is_torchao(state[name])}
        self.metadata: dict[str, str] = {}
        if skeleton.quantizer is not None:
            flat, quant_metadata = _flatten(skeleton, state)
            self.metadata = dict(quant_metadata)
        else:
            flat = dict(state)
        origin = {id(tensor): name for name, tensor in flat.items()}
        left_out = skeleton.left_out()
        stored_flat = skeleton.stored_names({k: v for k, v in flat.items() if _owner(k, quantised) not in left_out})
        pieces: dict[str, list[Piece]] = {}
        for name, tensor in stored_flat.items():
            key = origin[id(tensor)]
            owner = _owner(key, quantised)
            part = key.removeprefix(_prefix(owner)) if owner in quantised else None
            pieces.setdefault(owner, []).append(Piece(name, tensor.dtype, tuple(tensor.shape), part))
        self.entries: dict[str, Entry] = {}
        for name in stored:
            target = meta[loaded[name]]  # the skeleton's own tensor, as built in the read dtype
            dtype = read_dtype if target.is_floating_point() else target.dtype
            self.entries[name] = Entry(loaded[name], dtype, tuple(target.shape), loaded[name] in quantised,
                                       tuple(pieces.get(loaded[name], ())),
                                       self.metadata.get(loaded[name]) if loaded[name] in quantised else None)
        self.layers = len(quantised)
        if value != "bf16" and not self.layers:
            raise SkeletonError(f"{skeleton.component.name}: quantising to {value} changed no layer")
        self.total_size = sum(_nbytes(p, torch) for entry in self.entries.values() for p in entry.pieces)

    def header_metadata(self) -> dict[str, str]:
        """The `__metadata__` every output shard carries (as diffusers/transformers write it)."""
        if self.skeleton.library == "diffusers":
            return {"format": "pt", **self.metadata}
        return {**self.metadata, "format": "pt"}

    def specs(self, stored: list[str]) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """{output name: (dtype, shape)} of the output shard made from the input tensors `stored`."""
        return {p.name: (p.dtype, p.shape) for name in stored for p in self.entries[name].pieces}

    def index(self, weight_map: dict[str, str]) -> dict[str, Any]:
        """The shard index json (`metadata` and `weight_map`) as the library writes it for these files."""
        metadata: dict[str, Any] = {"total_size": self.total_size}
        if self.skeleton.library == "diffusers":
            metadata.update(self.metadata)
        else:
            metadata = {"total_parameters": self.skeleton.num_parameters(), **metadata}
        return {"metadata": metadata, "weight_map": weight_map}

    def record(self) -> dict[str, Any] | None:
        """The manifest's account of the quantisation (None when not quantised), as prepare.py has always written."""
        import torchao

        if self.config is None:
            return None
        granularities = self.config.granularity if isinstance(self.config.granularity, list | tuple) else [
            self.config.granularity]
        granularity = {GRANULARITIES.get(type(g).__name__, type(g).__name__) for g in granularities}
        record = {"precision": self.value, "made_on": "cpu", "torchao": torchao.__version__,
                  "config": type(self.config).__name__, "granularity": ", ".join(sorted(granularity)),
                  "layers": self.layers}
        if self.value == "fp8":
            record["hardware_check"] = fp8_cpu.HARDWARE_CHECK
        return record

    def write_config(self, into: Path) -> None:
        self.skeleton.save_config(into)


def _flatten(skeleton: Skeleton, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The libraries' own flattening of the (meta) quantised state dict: tensors and torchao metadata."""
    if skeleton.library == "diffusers":
        return skeleton.quantizer.get_state_dict_and_metadata(state, safe_serialization=True)
    return skeleton.quantizer.get_state_dict_and_metadata(skeleton.model)


def _is_torchao(tensor: Any) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(tensor, TorchAOBaseTensor)


def _prefix(name: str) -> str:
    """torchao's flattened-name prefix of a weight: `a.b._weight_` for `a.b.weight`."""
    module, attribute = name.rsplit(".", 1)
    return f"{module}._{attribute}_"


def _owner(flat_name: str, quantised: set[str]) -> str:
    """The state-dict name a flattened name belongs to (`a.b.weight` for `a.b._weight_qdata`; else itself)."""
    head, _, last = flat_name.rpartition(".")
    for end in (i for i, c in enumerate(last) if c == "_" and i > 0):
        name = f"{head}.{last[1:end]}" if head else last[1:end]
        if last.startswith("_") and name in quantised:
            return name
    return flat_name


def _nbytes(piece: Piece, torch: Any) -> int:
    size = torch.empty((), dtype=piece.dtype).element_size()
    for dim in piece.shape:
        size *= dim
    return size


def json_of(tensor: Any) -> str:
    """torchao's metadata of one quantised tensor, as flatten_tensor_state_dict writes it."""
    from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    return json.dumps(tensor, cls=TensorSubclassAttributeJSONEncoder)

