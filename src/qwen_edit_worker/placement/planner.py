"""Where the weights live: the fastest placement that fits this GPU with room for the largest job.

Why this exists: people rent the cheapest GPU class that works, and the model (57.7 GB in bf16,
about half in int8/fp8) fits some classes whole, others only if a component stays in CPU memory.
`OFFLOAD=auto` asks `plan` for the fastest placement whose peak fits, given the components' real
sizes and the GPU's total memory, with room for the largest job the API allows (2 MP,
num_images 4).  `plan` is a pure function of numbers, so every class is tested here without one.

Placements, fastest first (what crosses PCIe for every job in brackets):
- `none`: everything on the GPU [nothing].
- `text_encoder`: transformer and VAE stay on the GPU; the text encoder streams through the GPU
  layer by layer (diffusers group offload, prefetched on a CUDA stream) for the prompt [its bytes].
- `model`: each component moves to the GPU whole while it is used [all weights].
- `group`: every component streams layer by layer [all weights], the least GPU memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..weights.precision import linear_weight_bytes

GB = 1000**3
# Peak activations of the largest job the API allows (2 MP output, num_images 4, 3 steps): the
# transformer's MLP and attention intermediates for 4 x 16.6 k tokens (~5 GB) and the VAE decode
# of one 2 MP picture at a time with slicing (~4 GB) do not overlap; derived, not yet measured
# (a GPU run should record torch.cuda.max_memory_allocated for that job and this figure follow it).
JOB_HEADROOM_BYTES = 8 * GB
RESERVE_BYTES = int(1.5 * GB)  # CUDA context, cuBLAS workspaces, allocator fragmentation
STREAM_WINDOW_BYTES = int(2.5 * GB)  # a streamed component's layers on the GPU at once (2 largest leaves)
MODES = ("none", "text_encoder", "model", "group")  # fastest first
COMPONENTS = ("transformer", "text_encoder", "vae")
# The real model's component sizes, as `bench/gpu --bytes` counts them from the real configs (20.430 B,
# 8.292 B and 0.127 B parameters): bf16 is 2 bytes a parameter; int8/fp8 is 1 byte a quantised linear
# weight plus its per-row scales, the text encoder's vision tower and embeddings staying bf16.
REFERENCE_BYTES = {
    "transformer": {"bf16": int(40.86 * GB), "int8": int(20.46 * GB), "fp8": int(20.46 * GB)},
    "text_encoder": {"bf16": int(16.58 * GB), "int8": int(9.52 * GB), "fp8": int(9.52 * GB)},
    "vae": {"bf16": int(0.254 * GB)},
}


def reference_sizes(precision: str, text_encoder_precision: str) -> dict[str, int]:
    """The real model's component bytes at these precisions (REFERENCE_BYTES)."""
    return {"transformer": REFERENCE_BYTES["transformer"][precision],
            "text_encoder": REFERENCE_BYTES["text_encoder"][text_encoder_precision],
            "vae": REFERENCE_BYTES["vae"]["bf16"]}


@dataclass(frozen=True)
class Plan:
    """A placement and the numbers that decided it."""

    offload: str
    fits: bool
    need_bytes: int
    gpu_bytes: int | None
    moved_per_job_bytes: int
    reason: str

    def info(self) -> dict[str, object]:
        """The job output's `model.placement` block (GB, rounded)."""
        def gb(size: int | None) -> float | None:
            return None if size is None else round(size / GB, 1)

        return {"offload": self.offload, "need_gb": gb(self.need_bytes), "gpu_gb": gb(self.gpu_bytes),
                "moved_per_job_gb": gb(self.moved_per_job_bytes), "reason": self.reason}


def need(mode: str, sizes: Mapping[str, int], headroom: int = JOB_HEADROOM_BYTES) -> tuple[int, int]:
    """(peak GPU bytes, bytes moved to the GPU per job) of placement `mode` for component `sizes`."""
    t, te, vae = (sizes.get(c, 0) for c in COMPONENTS)

    def streamed(size: int) -> int:
        return min(size, STREAM_WINDOW_BYTES)

    peaks = {
        "none": (t + te + vae, 0),
        "text_encoder": (t + vae + streamed(te), te),
        "model": (max(t, te, vae), t + te + vae),
        "group": (streamed(t) + streamed(te) + vae, t + te + vae),
    }
    weights, moved = peaks[mode]
    return weights + headroom + RESERVE_BYTES, moved


def plan(sizes: Mapping[str, int], gpu_bytes: int | None, headroom: int = JOB_HEADROOM_BYTES,
         mode: str = "auto") -> Plan:
    """The placement for OFFLOAD=`mode`: as given, or (auto) the fastest that fits `gpu_bytes`.

    `sizes` are the components' bytes as they will sit in memory (after any quantisation);
    `gpu_bytes` is None without a GPU (then everything stays on the CPU, placement `none`).
    """
    total = sum(sizes.values())
    if gpu_bytes is None:
        if mode in ("auto", "none"):
            return Plan("none", True, total, None, 0, "no GPU: every component runs on the CPU")
        return Plan(mode, False, total, None, 0, f"OFFLOAD={mode} moves weights to a GPU and there is none")
    if mode != "auto":
        peak, moved = need(mode, sizes, headroom)
        fits = peak <= gpu_bytes
        verdict = "fits" if fits else "does NOT fit: expect out-of-memory errors; OFFLOAD=auto picks one that fits"
        return Plan(mode, fits, peak, gpu_bytes, moved, f"OFFLOAD={mode} as set; {_gb(peak)} needed of "
                    f"{_gb(gpu_bytes)}, {verdict}")
    for candidate in MODES:
        peak, moved = need(candidate, sizes, headroom)
        if peak <= gpu_bytes:
            faster = [f"{m} needs {_gb(need(m, sizes, headroom)[0])}" for m in MODES[:MODES.index(candidate)]]
            why = f"; faster ones do not fit ({', '.join(faster)})" if faster else ""
            return Plan(candidate, True, peak, gpu_bytes, moved,
                        f"fastest that fits: {_gb(peak)} needed of {_gb(gpu_bytes)}{why}")
    smallest, _ = need("group", sizes, headroom)
    return Plan("group", False, smallest, gpu_bytes, total, (
        f"nothing fits: even group offload needs {_gb(smallest)} (weights streamed, {_gb(headroom)} for a 2 MP, "
        f"num_images 4 job) and the GPU has {_gb(gpu_bytes)}; use a larger GPU class"))


def _gb(size: int) -> str:
    return f"{size / GB:.1f} GB"


# ---- Reading the sizes (not pure: reads safetensors headers, never the weights) ----

FLOATS = {"F32": 4, "BF16": 2, "F16": 2}


def folder_bytes(folder: Path, precision: str = "bf16") -> int:
    """Bytes a component's safetensors take on the GPU at `precision` (from the headers alone).

    Floating-point tensors load as bf16 (2 bytes an element).  A 2-D floating-point `.weight` (a
    linear layer's; embeddings excluded) counts as torchao stores it at `precision`
    (precision.linear_weight_bytes: scales included); tensors already stored quantised count as
    stored.  An estimate made before loading; the load log gives the bytes really resident afterwards.
    """
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            start, end = spec["data_offsets"]
            shape, size = spec["shape"], end - start
            if spec["dtype"] in FLOATS and len(shape) == 2 and name.endswith(".weight") and "embed" not in name:
                size = linear_weight_bytes(shape[0], shape[1], precision)
            elif spec["dtype"] in FLOATS:  # loaded as bf16 whatever the file stores
                size = size // FLOATS[spec["dtype"]] * 2
            total += size
    return total


def model_bytes(path: Path, precision: str, text_encoder_precision: str) -> dict[str, int]:
    """The three components' bytes in the diffusers folder `path`, at the precisions they will load in."""
    precisions = {"transformer": precision, "text_encoder": text_encoder_precision, "vae": "bf16"}
    return {name: folder_bytes(path / name, precisions[name]) for name in COMPONENTS}
