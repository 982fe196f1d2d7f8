"""One component prepared shard by shard: read a weight, fuse its Lightning pair, quantise it, write it, drop it.

Why this exists: preparing the transformer as an `nn.Module` (built once to fuse, once more to
quantise) held it in RAM, ~1.1 GB more for each of its 60 blocks (bench/bake: ~70 GB derived for the
real model), and wrote the fused transformer twice.  Here each safetensors shard of the component
becomes one output shard of the same name, a tensor at a time (rows at a time for large ones), and
the input shard is deleted as soon as its output is whole: memory holds one tensor's work, never a
shard (~1.1 GB for the whole process at real shape, whatever the number of blocks), and the disk
holds the outputs plus the shards not yet prepared.  What is made is what the whole-model bake made
(bench/prepare_before.py), bit for bit (tests/test_stream.py runs both):
- the plan (weights/stream_plan.py) fixes names, dtypes, shapes, the torchao metadata and the index
  from the libraries' own code on a meta-device skeleton;
- the values go through the same operations as `from_pretrained` + `lightning.fuse_pairs` +
  torchao: floating tensors cast to the stored dtype when the LoRA is fused (from_pretrained's
  `dtype=`), the pair added by `lightning.fused` (one addmm in that dtype), cast to the read dtype
  (bf16 for fp8, else as stored), then quantised by torchao's `quantize_` on an `nn.Linear` holding
  the weight, with the configuration the library's quantizer hands torchao (fp8 through fp8_cpu);
- a tensor larger than CHUNK_BYTES (32 MiB; at real shape smaller blocks were faster here than
  128 MiB ones, and held less) is read, cast, quantised and written a block of rows at a time:
  per-row quantisation (int8 and fp8 here) makes each row's values and scale from that row alone
  (the row's amax, then elementwise division, rounding and casts), so the rows are the same bits;
  each block's torchao metadata is checked against the plan's (a configuration whose scales are not
  per row has a scale that is not row-shaped, and is quantised whole).  A fused weight is fused whole
  (one addmm, as fuse_pairs does), then cut into blocks.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import fp8_cpu, lightning
from .shards import ShardError, ShardWriter, header
from .stream_plan import Entry, Plan, json_of

log = logging.getLogger(__name__)
CHUNK_BYTES = 32 * 1024**2  # rows of a tensor read, cast, quantised and written at once (in the read dtype)
ROW_ALIGN = 16  # blocks of rows are multiples of this: fp8 quantises only weights whose rows are (torchao)
STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def floating_dtype(shard: Path) -> Any:
    """The torch dtype of a shard's first floating-point weight (in its header's order), or None."""
    import torch

    tensors, _ = header(shard)
    for name, tensor in tensors.items():
        if name != "__metadata__" and tensor["dtype"] in STORED_DTYPES:
            return getattr(torch, STORED_DTYPES[tensor["dtype"]])
    return None


class ComponentStream:
    """One component of a pipeline folder, rewritten shard by shard into `.<name>.streamed/` and swapped in whole.

    `shards` are the input files in the order they are prepared (the index's, sorted; else `shards` as given, or
    the folder's one file).  `make_plan(stored names, stored dtype)` builds the plan when the first shard is there
    (the stored dtype is read from it, as the whole-model bake read it); `add(shard)` prepares the next shard;
    `finish()` writes the config files and the index and puts the new component in place of the old.  `pairs`
    are the Lightning LoRA's (down, up) pairs by layer when the LoRA is fused into this component (lora_stream.py's
    LayerPairs: each made when popped, and dropped once added).
    """

    def __init__(self, component: Path, make_plan: Any, pairs: Any,
                 chunk_bytes: int = CHUNK_BYTES, shards: list[str] | None = None) -> None:
        self.component, self.make_plan, self.pairs, self.chunk_bytes = component, make_plan, pairs, chunk_bytes
        self.out = component.with_name(f".{component.name}.streamed")
        indexes = sorted(component.glob("*.safetensors.index.json"))
        self.index_name = indexes[0].name if indexes else None
        if indexes:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            self.shards = sorted(set(weight_map.values()))
            self.stored: list[str] | None = list(weight_map)
        else:
            self.shards = shards if shards is not None else sorted(p.name for p in component.glob("*.safetensors"))
            self.stored = None  # the single file's header names them
        if len(self.shards) > 1 and not indexes:
            raise ShardError(f"{component.name}/ holds {len(self.shards)} safetensors files and no index")
        if not self.shards:
            raise ShardError(f"{component.name}/ has no safetensors weights")
        self.plan: Plan | None = None
        self.done: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.seconds = 0.0
        self.dtype: Any = None  # the stored dtype, read from the first shard

    def next_shard(self) -> str | None:
        """The input shard to prepare next (relative to the component), or None when all are done."""
        return self.shards[len(self.done)] if len(self.done) < len(self.shards) else None

    def add(self, shard: Path) -> None:
        """Prepare `shard` (it must be `next_shard()`) into the output folder, then delete it."""
        started = time.perf_counter()
        if shard.name != self.next_shard():
            raise ShardError(f"{self.component.name}: {shard.name} arrived out of order (expected {self.next_shard()})")
        from safetensors import safe_open

        tensors, _ = header(shard)
        names = [n for n in tensors if n != "__metadata__"]
        if self.plan is None:
            self.dtype = floating_dtype(shard)
            if self.dtype is None:
                raise ShardError(f"{self.component.name}/{shard.name} has no floating-point weights")
            self.plan = self.make_plan(self.stored if self.stored is not None else names, self.dtype)
            self.out.mkdir(parents=True, exist_ok=True)
        plan = self.plan
        strangers = [n for n in names if n not in plan.entries]
        if strangers:
            raise ShardError(f"{self.component.name}/{shard.name}: {strangers[0]} is not in the component's index")
        specs = plan.specs(names)
        with ShardWriter(self.out / shard.name, specs, plan.header_metadata()) as writer, \
                safe_open(str(shard), framework="pt", device="cpu") as handle, \
                fp8_cpu.answered() if plan.value == "fp8" else nullcontext():
            for name in names:
                self._tensor(handle, shard, name, tensors[name], plan.entries[name], writer)
        self.weight_map.update(dict.fromkeys(specs, shard.name))
        shard.unlink()  # the output is whole: the input's disk space goes back
        self.done.append(shard.name)
        self.seconds += time.perf_counter() - started
        log.info("%s: shard %d/%d (%s) prepared in %.1f s", self.component.name, len(self.done), len(self.shards),
                 shard.name, time.perf_counter() - started)

    def finish(self) -> None:
        """The config files and index beside the shards, then the new component swapped in for the old one."""
        if self.next_shard() is not None or self.plan is None:
            raise ShardError(f"{self.component.name}: {len(self.shards) - len(self.done)} shards were not prepared")
        if self.pairs:
            raise ShardError(f"{self.component.name}: {len(self.pairs)} Lightning pairs found no weight "
                             f"(e.g. {next(iter(self.pairs))})")
        self.plan.write_config(self.out)
        if self.index_name is not None:
            text = json.dumps(self.plan.index(self.weight_map), indent=2, sort_keys=True) + "\n"
            (self.out / self.index_name).write_text(text)
        old = self.component.with_name(f".{self.component.name}.old")
        self.component.replace(old)
        self.out.replace(self.component)
        shutil.rmtree(old)

    def _tensor(self, handle: Any, shard: Path, name: str, stored: dict[str, Any], entry: Entry,
                writer: ShardWriter) -> None:
        """Read `name`, fuse, cast and quantise it as planned, and write its pieces."""
        if tuple(stored["shape"]) != entry.shape:
            raise ShardError(f"{self.component.name}/{shard.name}: {name} is {stored['shape']}, the model's "
                             f"{entry.loaded} is {list(entry.shape)}")
        if not entry.pieces:
            return  # a tied weight: stored once, under its other name
        # With the LoRA fused, from_pretrained(dtype=<stored>) cast every floating tensor before the fuse, and the
        # fused component was read again in the read dtype to be quantised: the same two casts here.
        fuse_dtype = self.dtype if self.pairs is not None and stored["dtype"] in STORED_DTYPES else None
        pair = self.pairs.pop(entry.loaded.removesuffix(".weight"), None) if self.pairs is not None and \
            entry.loaded.endswith(".weight") else None
        if pair is not None:
            whole = lightning.fused(handle.get_tensor(name).to(fuse_dtype), *pair)
            blocks = self._blocks(entry, lambda a, b: whole[a:b])
        else:
            view = handle.get_slice(name)

            def read(a: int, b: int) -> Any:
                block = view[a:b] if entry.shape else handle.get_tensor(name)
                return block.to(fuse_dtype) if fuse_dtype is not None else block

            blocks = self._blocks(entry, read)
        for row, block in blocks:
            block = block.to(entry.dtype) if block.is_floating_point() else block
            if entry.quantised:
                self._write_quantised(entry, block, row, writer)
            else:
                writer.write(entry.pieces[0].name, block, row)

    def _blocks(self, entry: Entry, read: Any) -> Any:
        """(first row, tensor) blocks of at most chunk_bytes; a whole tensor when it cannot be split by rows."""
        import torch

        rows = entry.shape[0] if entry.shape else 1
        row_bytes = torch.empty((), dtype=entry.dtype).element_size()
        for dim in entry.shape[1:]:
            row_bytes *= dim
        step = max(ROW_ALIGN, self.chunk_bytes // max(1, row_bytes) // ROW_ALIGN * ROW_ALIGN)
        if not entry.shape or (entry.quantised and not all(p.shape and p.shape[0] == rows for p in entry.pieces)):
            step = rows
        for first in range(0, rows, step):
            yield first, read(first, min(rows, first + step))

    def _write_quantised(self, entry: Entry, block: Any, row: int, writer: ShardWriter) -> None:
        import torch
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        from torchao.quantization import quantize_
        from torchao.utils import TorchAOBaseTensor

        linear = torch.nn.Linear(block.shape[1], block.shape[0], bias=False, device="meta")
        linear._parameters["weight"] = torch.nn.Parameter(block, requires_grad=False)
        quantize_(linear, self.plan.config)
        made = linear.weight
        if not isinstance(made, TorchAOBaseTensor) or json_of(made) != entry.tensor_json:
            made_as = json_of(made)[:200] if isinstance(made, TorchAOBaseTensor) else "not quantised"
            raise ShardError(f"{self.component.name}: rows {row}-{row + block.shape[0]} of {entry.loaded} came out "
                             f"{made_as}, not as planned ({(entry.tensor_json or '')[:200]})")
        flat, _ = flatten_tensor_state_dict({"block.weight": made})
        parts = {key.removeprefix("block._weight_"): value for key, value in flat.items()}
        for piece in entry.pieces:
            writer.write(piece.name, parts[piece.part], row)

