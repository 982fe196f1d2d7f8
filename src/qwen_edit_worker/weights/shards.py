"""safetensors files read and written a tensor at a time: what lets the bake stream.

Why this exists: `safetensors.torch.save_file` takes a whole dict of tensors and serialises it in
one call, so writing a 5 GB output shard with it means holding all of it in memory first.  The
format is simple enough to write in the open (an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, padded with spaces to a multiple of 8, then the
bytes), so `ShardWriter` writes the header first, from the tensors' names, dtypes and shapes known
in advance (weights/stream_plan.py), and then each tensor's bytes at its offset as soon as it is
made, rows at a time if need be: memory holds one piece, never a shard.  Tensors are laid out as
safetensors lays them out (wider dtypes first, then by name), which keeps every tensor aligned to
its element size.  What is written is read back by safetensors' own reader (`safe_open`) and by
`from_pretrained` (tests/test_stream.py).  `header` reads a file's header without its data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

# safetensors' dtype names (its spec) for the torch dtypes a bake stores.
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int8": "I8",
               "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL",
               "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
MAX_HEADER = 100 * 1024**2  # safetensors' own limit


class ShardError(Exception):
    """A shard that cannot be read or written as planned; the message names the file and the tensor."""


def dtype_name(dtype: Any) -> str:
    """safetensors' name for a torch dtype (ShardError for one a bake never stores)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ShardError(f"no safetensors dtype for {dtype}")
    return DTYPE_NAMES[name]


def torch_dtype(name: str) -> Any:
    """The torch dtype of a safetensors dtype name (ShardError for one a bake never stores)."""
    import torch

    for torch_name, stored in DTYPE_NAMES.items():
        if stored == name:
            return getattr(torch, torch_name)
    raise ShardError(f"no torch dtype for safetensors' {name}")


def header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, read without its data."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER:
                raise ShardError(f"{path.name}: header length {length} is implausible")
            raw = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise ShardError(f"{path.name}: unreadable safetensors header ({type(err).__name__})") from None
    metadata = raw.pop("__metadata__", None) or {}
    return raw, metadata


class ShardWriter:
    """One safetensors file written tensor by tensor: `with ShardWriter(path, specs, metadata) as out: out.write(...)`.

    `specs` is {name: (torch dtype, shape)}.  The file is created whole-sized at once (header, then the data
    area as a sparse hole); `write(name, tensor, row)` puts a tensor, or rows of it starting at `row`, in place.
    On leaving the block every byte of every tensor must have been written, else ShardError and the file is
    removed; on an error inside the block the file is removed too.  Nothing half-written stays behind.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[Any, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        import torch

        self.path = path
        order = sorted(specs, key=lambda n: (-torch.empty((), dtype=specs[n][0]).element_size(), n))
        self.layout: dict[str, tuple[int, int, Any, tuple[int, ...]]] = {}  # name: (start, end, dtype, shape)
        entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name in order:
            dtype, shape = specs[name]
            size = torch.empty((), dtype=dtype).element_size()
            for dim in shape:
                size *= dim
            self.layout[name] = (offset, offset + size, dtype, tuple(shape))
            entries[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes: the data starts aligned
        self.base = 8 + len(text)
        self.size = self.base + offset
        self.written = dict.fromkeys(self.layout, 0)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(self._fd, struct.pack("<Q", len(text)) + text)
            os.ftruncate(self._fd, self.size)
        except OSError:
            self._abandon()
            raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None:
            self._abandon()
            return
        missing = [name for name, done in self.written.items() if done != self._nbytes(name)]
        if missing:
            self._abandon()
            raise ShardError(f"{self.path.name}: {len(missing)} tensors were not written (e.g. {missing[0]})")
        os.close(self._fd)

    def write(self, name: str, tensor: Any, row: int = 0) -> None:
        """Write `tensor` (the whole of `name`, or its rows from `row` on) at its place in the file."""
        start, end, dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:] or row + (
                tensor.shape[0] if tensor.dim() else 1) > (shape[0] if shape else 1):
            raise ShardError(f"{self.path.name}: {name} is planned as {dtype} {list(shape)}, got {tensor.dtype} "
                             f"{list(tensor.shape)} at row {row}")
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch_uint8()).numpy())
        at = start + (row * (end - start) // shape[0] if shape and shape[0] else 0)
        while data:  # pwrite may write less than asked
            done = os.pwrite(self._fd, data, self.base + at)
            data, at = data[done:], at + done
            self.written[name] += done

    def _nbytes(self, name: str) -> int:
        start, end, _, _ = self.layout[name]
        return end - start

    def _abandon(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def torch_uint8() -> Any:
    import torch

    return torch.uint8
