"""Checking that a LoRA file is a whole, well-formed safetensors file before anything loads it.

Why this exists: a LoRA comes from anywhere, and the formats people share include pickles
(`.ckpt`, `.pt`, `.bin`), which run code when unpickled.  This worker never unpickles: a file
is accepted only when it is safetensors, read here from its header alone (an 8-byte little-endian
length, a JSON table of tensors with dtype, shape and byte offsets) and checked against the file's
real size, so a truncated download, a lying header or a non-LoRA file is a clean error before
safetensors or diffusers see it.  Pure: no torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
LORA_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight")
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle protocol opcode; a zip (torch.save's format)


class SafetensorsProblem(ValueError):
    """What is wrong with the file, in words a caller can act on."""


@dataclass(frozen=True)
class Header:
    """The tensors a file declares: name -> (dtype, shape)."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @property
    def lora_layers(self) -> int:
        """How many layers the file carries a LoRA for (one down/A matrix each)."""
        return sum(name.endswith(LORA_DOWN_SUFFIXES) for name in self.tensors)


def check_file(path: Path) -> Header:
    """Read and check `path`'s header against its size; raise SafetensorsProblem."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if head.startswith(PICKLE_MAGIC):
            raise SafetensorsProblem("this is a pickle or PyTorch checkpoint, which this worker never loads (it can "
                                     "run code); convert it to .safetensors")
        if len(head) < 8:
            raise SafetensorsProblem(f"not a safetensors file ({size} bytes, too short for a header)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise SafetensorsProblem("not a safetensors file (its first 8 bytes are no header length that fits "
                                     f"the file's {size:,} bytes), or it is cut off")
        raw = handle.read(length)
    return parse_header(raw, size - 8 - length)


def parse_header(raw: bytes, data_bytes: int) -> Header:
    """Check a header's JSON against the `data_bytes` that follow it."""
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SafetensorsProblem("not a safetensors file (its header is not JSON)") from None
    if not isinstance(table, dict):
        raise SafetensorsProblem("not a safetensors file (its header is not a table of tensors)")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = (dtype in DTYPE_BYTES and all(isinstance(n, int) and n >= 0 for n in (*shape, start, stop))
                     and stop - start == math.prod(shape) * DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise SafetensorsProblem(f"its header is malformed at tensor {name[:80]!r}")
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    if end > data_bytes:
        raise SafetensorsProblem(f"the file is cut off: its header needs {end:,} bytes of tensor data, it holds "
                                 f"{data_bytes:,}")
    if not tensors:
        raise SafetensorsProblem("the file holds no tensors")
    return Header(tensors)
