"""Build-time preparation of a baked pipeline folder: the Lightning LoRA fused, components stored quantised.

Why this exists: without it every cold start reads the LoRA file, fuses it into the 20 B
transformer, and (with PRECISION/TEXT_ENCODER_PRECISION set) quantises 28 B parameters, and the
image carries and the host reads the full bf16 weights.  builder/bake.py prepares the folder once,
on the build machine (a CPU is enough for the fuse, int8 and fp8: fp8 through torchao's own code
with its hardware question answered, weights/fp8_cpu.py), and the worker then loads the stored
result as it is: `manifest.json`'s `prepared` block says what was done (`quantised`: per
component, the precision, where and with which torchao and configuration), and the loader skips
it (model/sources.py refuses settings that contradict it).

It streams (weights/stream.py): each safetensors shard of the transformer and the text encoder is
read, fused, quantised and written as one output shard, a tensor at a time, and deleted; no
`nn.Module` holding the weights is ever built, so memory does not grow with the model, and
`Preparation.add` takes each shard as soon as the bake has downloaded it.  What it stores is what
the whole-model bake stored before (bench/prepare_before.py: `from_pretrained` with a
TorchAoConfig, then `save_pretrained`), bit for bit: the fuse first, in the checkpoint's own dtype
(a bf16 LoRA over quantised weights gave grid artifacts upstream), then torchao's quantisation in
safetensors with its metadata (torchao >= 0.16), so `from_pretrained` loads it quantised.  fp8
reads the weights as bf16 whatever the checkpoint stores: torchao's per-row fp8 takes bf16 only,
and bf16 is what the worker reads them as on a GPU before quantising at load.  A new component is
swapped in only when whole; the folder's shards are consumed as they are prepared, so a failure
leaves the folder unusable (the bake works in a staging folder it removes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import fp8_cpu, lightning_file, precision
from .errors import ModelLoadError
from .lora_stream import LayerPairs
from .shards import ShardError
from .skeleton import SkeletonError, build
from .stream import CHUNK_BYTES, ComponentStream, floating_dtype
from .stream_plan import Plan

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 4 * 1024**2
COMPONENTS = ("transformer", "text_encoder")  # in the order they are prepared: the LoRA's memory goes first


class PrepareError(Exception):
    """A preparation step failed or cannot run on this machine; the message says which and why."""


def prepare(folder: Path, lora: Path | None, lora_ref: str | None, transformer_precision: str,
            text_encoder_precision: str, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Fuse `lora` (when given) and quantise in `folder`, whose shards are all there; the manifest's `prepared`."""
    preparation = Preparation(folder, lora, lora_ref, transformer_precision, text_encoder_precision, chunk_bytes)
    for shard in preparation.pending():
        preparation.add(folder / shard)
    return preparation.finish()


def streamed(transformer_precision: str, text_encoder_precision: str, fuse: bool) -> list[str]:
    """The components a preparation rewrites, in the order it prepares them."""
    values = {"transformer": transformer_precision, "text_encoder": text_encoder_precision}
    return [name for name in COMPONENTS if values[name] != "bf16" or (name == "transformer" and fuse)]


def estimate_bytes(folder: Path, transformer_precision: str, text_encoder_precision: str, fuse: bool
                   ) -> dict[str, int]:
    """What each rewritten component will take on disk, from its config alone (bf16 weights assumed, as published):
    quantised linears at precision.linear_weight_bytes, the rest at 2 bytes a value.  For the bake's disk check."""
    import torch

    index = json.loads((folder / "model_index.json").read_text())
    values = {"transformer": transformer_precision, "text_encoder": text_encoder_precision}
    out = {}
    with _as_prepare_error():
        for name in streamed(transformer_precision, text_encoder_precision, fuse):
            library, class_name = index[name]
            model = build(folder / name, library, class_name, torch.bfloat16,
                          _quantization_config(folder / name, library, values[name]))
            out[name] = sum(precision.linear_weight_bytes(*t.shape, values[name]) if t.dim() == 2 and
                            model.chooses(key) else t.numel() * 2 for key, t in model.state_dict().items())
    return out


class Preparation:
    """The preparation of one pipeline folder, fed shard by shard in the order `pending()` gives.

    Built once the folder holds model_index.json, each component's config and shard index (and the LoRA, when it
    is fused): the LoRA is read and checked against the transformer's layers here, before any shard is needed.
    """

    def __init__(self, folder: Path, lora: Path | None, lora_ref: str | None, transformer_precision: str,
                 text_encoder_precision: str, chunk_bytes: int = CHUNK_BYTES, files: Sequence[str] | None = None
                 ) -> None:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()  # a build log, not a terminal
        transformers.utils.logging.disable_progress_bar()
        return_freed_memory()
        self.started = time.perf_counter()
        for flag, value in (("--precision", transformer_precision),
                            ("--text-encoder-precision", text_encoder_precision)):
            check_can_quantise(flag, value)
        self.folder, self.lora, self.lora_ref = folder, lora, lora_ref
        self.values = {"transformer": transformer_precision, "text_encoder": text_encoder_precision}
        self.index = json.loads((folder / "model_index.json").read_text())
        with _as_prepare_error():
            pairs = self._pairs(lora) if lora is not None else None
            self.streams = {name: ComponentStream(folder / name, self._plan_maker(name),
                                                  pairs if name == "transformer" else None, chunk_bytes,
                                                  _shards(files, name))
                            for name in streamed(transformer_precision, text_encoder_precision, lora is not None)}
        self.layers = len(pairs) if pairs is not None else None

    def pending(self) -> list[str]:
        """Every shard still to prepare (relative to the folder), in the order `add` takes them."""
        return [f"{name}/{shard}" for name, stream in self.streams.items() for shard in stream.shards
                if shard not in stream.done]

    def add(self, shard: Path) -> None:
        """Prepare one downloaded shard (the next of its component) and delete it."""
        with _as_prepare_error():
            self.streams[shard.parent.name].add(shard)

    def finish(self) -> dict[str, Any]:
        """Swap the prepared components in, remove the fused LoRA, and return the manifest's `prepared` block."""
        with _as_prepare_error():
            for stream in self.streams.values():
                stream.finish()
        quantised = {name: stream.plan.record() for name, stream in self.streams.items()
                     if stream.plan is not None and stream.plan.record() is not None}
        for name, record in quantised.items():
            log.info("%s: %d linear layers quantised to %s on cpu", name, record["layers"], record["precision"])
        if self.lora is not None:
            if self.lora.parent.name == "lightning":  # the baked layout: the folder holds only the LoRA
                shutil.rmtree(self.lora.parent)
            else:
                self.lora.unlink()
        seconds = round(time.perf_counter() - self.started, 1)
        log.info("prepared in %.1f s: LoRA %s, transformer %s, text encoder %s", seconds,
                 f"fused ({self.layers} layers)" if self.layers else "not fused", self.values["transformer"],
                 self.values["text_encoder"])
        return {"fused_lora": self.lora_ref if self.lora is not None else None, "fused_layers": self.layers,
                "precision": dict(self.values), **({"quantised": quantised} if quantised else {}),
                "seconds": seconds}

    def _pairs(self, lora: Path) -> LayerPairs:
        """The LoRA's (down, up) pairs, checked against the transformer's linears (lightning_file.py), each read
        when it is fused (lora_stream.py)."""
        import diffusers
        import torch

        shapes = build(self.folder / "transformer", "diffusers", self.index["transformer"][1], torch.bfloat16)
        try:
            return LayerPairs(lora, "--fuse-lightning", getattr(diffusers, self.index["_class_name"]),
                              lightning_file.linear_shapes(shapes.model))
        except ModelLoadError as err:
            raise PrepareError(str(err)) from None

    def _plan_maker(self, name: str) -> Any:
        """plan(stored names, stored dtype) for component `name`, as from_pretrained would load it."""
        import torch

        library, class_name = self.index[name]
        value = self.values[name]
        component = self.folder / name

        def plan(stored: list[str], dtype: Any) -> Plan:
            read_dtype = torch.bfloat16 if value == "fp8" else dtype
            skeleton = build(component, library, class_name, read_dtype, _quantization_config(component, library,
                                                                                                  value))
            return Plan(skeleton, stored, value, read_dtype)

        return plan


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve allocations of `threshold` bytes and more by mmap, so they go back to the system when freed.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which blocks of
    that size come from its heaps, which keep freed space: over the thousands of blocks a bake quantises, a
    process's anonymous memory crept up (measured: +0.7 GB over lm_head's 33 blocks in fp8, 0.5 GB of it released
    only by malloc_trim; none with the threshold fixed).  Fixing the threshold (mallopt) keeps it flat.  Returns
    whether it was set (False where the C library is not glibc).  Process-wide: the bake's process is the bake's.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def check_can_quantise(flag: str, value: str) -> None:
    """int8 and fp8 both quantise on the build machine's CPU; fp8 with the torchao version it was checked for."""
    if value not in precision.PRECISIONS:
        raise PrepareError(f"{flag}: must be one of {', '.join(precision.PRECISIONS)} (got {value!r})")
    problem = fp8_cpu.unsupported() if value == "fp8" else None
    if problem:
        raise PrepareError(f"{flag}: {problem}")


def stored_dtype(component: Path) -> Any:
    """The torch dtype of the component's first floating-point weight, read from its safetensors headers."""
    for path in sorted(component.glob("*.safetensors")):
        with _as_prepare_error():
            dtype = floating_dtype(path)
        if dtype is not None:
            return dtype
    raise PrepareError(f"{component.name}/ has no floating-point safetensors weights")


def _quantization_config(component: Path, library: str, value: str) -> Any:
    """The TorchAoConfig the whole-model bake passed to from_pretrained for this component (None for bf16)."""
    if value == "bf16":
        return None
    if library == "diffusers":
        import diffusers

        return diffusers.TorchAoConfig(precision.torchao_config(value))
    import transformers

    tied = bool(getattr(transformers.AutoConfig.from_pretrained(component), "tie_word_embeddings", False))
    return transformers.TorchAoConfig(precision.torchao_config(value),
                                      modules_to_not_convert=precision.text_encoder_kept(tied))


def _shards(files: Sequence[str] | None, name: str) -> list[str] | None:
    """The safetensors files of component `name` among `files` (folder-relative), or None to look in the folder."""
    if files is None:
        return None
    return sorted(f.split("/", 1)[1] for f in files if f.startswith(f"{name}/") and f.endswith(".safetensors"))


@contextmanager
def _as_prepare_error() -> Iterator[None]:
    """Errors of the streamed work become PrepareError with their message (bake.py's exit code 7)."""
    try:
        yield
    except (SkeletonError, ShardError, ModelLoadError) as err:
        raise PrepareError(str(err)) from None
