"""From a cut-down real-shape folder to the whole model: bytes counted from the real configs, times derived.

Why this exists: the folder bench/realfolder.py writes has N of the transformer's 60 blocks and 2 of the
text encoder's 28 layers, so its load is measured on 4-10 GB, not 30-58 GB.  The blocks (and layers) are
identical, so the whole model's bytes are the folder's plus the missing blocks, each as large as block 0
is in the folder's own safetensors headers (the LoRA file's block 0 likewise): the layout's exact bytes,
quantisation scales included.  They are set beside placement.REFERENCE_BYTES (the meta-device count of
the same configs) as a check.  The times are DERIVED, never measured (`times` says how): the raw read
at the measured rate; ready from the run's own timeline, its byte-bound parts stretched by the bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import benchlib  # noqa: F401 (puts src/ on the path)
from qwen_edit_worker.placement import REFERENCE_BYTES, realconfig

# component folder -> (the prefixes of one repeated unit's tensors, units in the real model).  transformers 5
# saves Qwen2.5-VL under the published checkpoint's names (model.layers.N); its module path is the other one.
REPEATED = {"transformer": (("transformer_blocks.0.",), realconfig.TRANSFORMER_CONFIG["num_layers"]),
            "text_encoder": (("model.layers.0.", "model.language_model.layers.0."),
                             realconfig.TEXT_CONFIG["num_hidden_layers"]),
            "lightning": (("transformer_blocks.0.",), realconfig.TRANSFORMER_CONFIG["num_layers"])}


def unit_bytes(component: Path, prefix: tuple[str, ...]) -> int:
    """Data bytes of the tensors under `prefix` (any of them) in a component's safetensors files (headers only)."""
    total = 0
    for path in sorted(component.glob("*.safetensors")):
        with path.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for name, t in header.items()
                     if name != "__metadata__" and name.startswith(prefix))
    return total


def full_bytes(folder: Path, component_bytes: dict[str, int], units: dict[str, int]) -> dict[str, int]:
    """Each component's bytes with every repeated unit present (`units`: how many the folder has)."""
    out = dict(component_bytes)
    for name, (prefix, real) in REPEATED.items():
        if name in out:
            out[name] += (real - units[name]) * unit_bytes(folder / name, prefix)
    return out


def derive(folder: Path, measured: dict[str, Any]) -> dict[str, Any]:
    """The whole model's bytes and the times they imply at this run's rates (marked derived)."""
    blocks = measured["blocks"]
    sizes = full_bytes(folder, measured["component_bytes"], {"transformer": blocks, "lightning": blocks,
                                                             "text_encoder": measured["text_layers"]})
    precision = "int8" if measured["layout"] == "int8" else "bf16"
    return {
        "derived": True,
        "bytes": sum(sizes.values()), "gb": round(sum(sizes.values()) / 1e9, 2),
        "component_gb": {name: round(size / 1e9, 3) for name, size in sizes.items()},
        "reference_gb": {"transformer": round(REFERENCE_BYTES["transformer"][precision] / 1e9, 2),
                         "text_encoder": round(REFERENCE_BYTES["text_encoder"][precision] / 1e9, 2),
                         "vae": round(REFERENCE_BYTES["vae"]["bf16"] / 1e9, 3)},
        **times(measured, sum(sizes.values())),
    }


def times(measured: dict[str, Any], total: int) -> dict[str, Any]:
    """raw_read_s and ready_s for `total` bytes, from one run's figures (pure; DERIVED).

    The raw read at the run's best rate.  Ready: the fixed part (the worker's imports_s, else the moment 1% of
    the folder was read) and the read both start at the process's start; the read (1% to 99% of the folder)
    stretches by the bytes ratio, and what came after both (construction, the LoRA fuse) too.  A worker ready
    before it had read 99% (tensors still file-backed) gets the plain estimate: fixed + the rest x the ratio.
    """
    ratio = total / measured["bytes"]
    raw = total / (measured["raw_read_gb_s"] * 1e9)
    ready, start, end = measured["ready_s"], measured.get("worker_folder_read_1pct_s"), measured.get(
        "worker_folder_read_99pct_s")
    fixed, fixed_from = measured.get("imports_s"), "the worker's imports_s"
    if fixed is None:
        fixed, fixed_from = start or 0.0, "when 1% of the folder was read"
    if start is None or end is None:
        derived, how = fixed + (ready - fixed) * ratio, f"{fixed_from} + (ready_s - it) x ratio"
    else:
        read_end = start + (end - start) * ratio
        derived = max(fixed, read_end) + max(0.0, ready - max(fixed, end)) * ratio
        how = (f"max({fixed_from}, the read's 1%..99% stretched x ratio) + what came after both x ratio")
    return {"how": f"bytes: the folder's, plus the missing transformer blocks, text-encoder layers (and LoRA blocks) "
                   f"at block 0's bytes in its own headers; raw_read_s at the measured raw_read_gb_s; ready_s = "
                   f"{how}; ratio {ratio:.2f}",
            "raw_read_s": round(raw, 1), "ready_s": round(derived, 1), "ready_over_raw_read": round(derived / raw, 2)}
