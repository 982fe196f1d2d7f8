"""Where the weights live: the fastest placement that fits this GPU with room for a 1 MP one-image job.

Why this exists: people rent the cheapest GPU class that works, and the model (57.7 GB in bf16,
about half in int8/fp8) fits some classes whole, others only if a component stays in CPU memory.
`OFFLOAD=auto` asks `plan` for the fastest placement whose peak fits, given the components' real
sizes and the GPU's total memory, with room for the *base job* (1 MP output, one picture, one
image: activations.BASE_JOB), not for the largest job the API allows.  Larger jobs are sized per
job against the room the plan leaves (`Plan.batch_for`: more images run as several batches; a job
that cannot fit even one image is refused before it starts, placement/jobs.py).  `plan` is a pure
function of numbers, so every class is tested without one.

Placements, fastest first (what crosses PCIe for every job in brackets):
- `none`: everything on the GPU [nothing].
- `text_encoder`: transformer and VAE stay on the GPU; the text encoder streams through the GPU
  layer by layer (diffusers group offload, prefetched on a CUDA stream) for the prompt [its bytes,
  ~0.4 s at 25 GB/s for int8].
- `model`: each component moves to the GPU whole while it is used [all weights].
- `group`: every component streams layer by layer [the transformer once per step, plus the rest].

Peak memory is taken phase by phase (text encoding, denoising, VAE), since a job's phases run one
after another: the weights on the GPU during the phase plus that phase's activations, plus
RESERVE_BYTES for CUDA itself.  Transfer times are DERIVED at PCIE_BYTES_PER_SECOND (gen4 x16,
~25 GB/s effective), not measured.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..weights.precision import linear_weight_bytes, stored_quantised
from . import activations
from .activations import BASE_JOB, GB, JobShape

RESERVE_BYTES = int(1.5 * GB)  # CUDA context, cuBLAS workspaces, allocator fragmentation
# A streamed component's layers on the GPU at once (leaf-level group offload, the next leaf prefetched):
# the text encoder's largest leaf is its bf16 token embedding (152064 x 3584, 1.09 GB) plus one layer's linears
# (its lm_head never runs nor is held: model/text_phase.py); the transformer's largest leaves are 75 MB MLPs.
STREAM_WINDOW_BYTES = {"transformer": int(0.5 * GB), "text_encoder": int(1.3 * GB), "vae": int(0.3 * GB)}
PCIE_BYTES_PER_SECOND = 25 * GB  # derived: PCIe gen4 x16 effective
DEFAULT_STEPS = 3  # the Lightning default; group offload streams the transformer once per step
LARGE_GPU_BYTES = 48 * GB  # MEMORY_SAVING=auto (VAE slicing and tiling) is on below this, as model/accel.py
MAX_API_MEGAPIXELS = 4.0  # explicit width x height up to 2048 x 2048
MAX_API_IMAGES = 4
MODES = ("none", "text_encoder", "model", "group")  # fastest first
COMPONENTS = ("transformer", "text_encoder", "vae")
# Small models that stay on the GPU in every placement (the safety checker, ~0.17 GB in bf16: safety/).
ALWAYS_RESIDENT = ("safety_checker",)
PHASES = ("text", "denoise", "decode")
# The real model's component sizes as the worker holds them, as `bench/gpu --bytes` counts them from the real
# configs (20.430 B, 8.292 B and 0.127 B parameters): bf16 is 2 bytes a parameter; int8/fp8 is 1 byte a quantised
# linear weight plus its per-row scales, the text encoder's vision tower and embeddings staying bf16.  The text
# encoder's lm_head (0.545 B parameters: 1.09 GB bf16, 0.55 GB int8/fp8) is read but dropped at load
# (model/text_phase.py), so it is not held: 16.58 GB as stored in bf16, 15.49 held; 9.52 and 8.97 at int8/fp8.
REFERENCE_BYTES = {
    "transformer": {"bf16": int(40.86 * GB), "int8": int(20.46 * GB), "fp8": int(20.46 * GB)},
    "text_encoder": {"bf16": int(15.49 * GB), "int8": int(8.97 * GB), "fp8": int(8.97 * GB)},
    "vae": {"bf16": int(0.254 * GB)},
    # Falconsai/nsfw_image_detection (ViTForImageClassification, ViT-base/16, 2 labels): 85,800,194
    # parameters, counted on the meta device from its config, in bf16; loaded unless SAFETY_CHECKER=off.
    "safety_checker": {"bf16": 2 * 85_800_194},
}


def reference_sizes(precision: str, text_encoder_precision: str, safety_checker: bool = True) -> dict[str, int]:
    """The real model's component bytes at these precisions (REFERENCE_BYTES), with the safety checker's
    when the worker loads it (`safety_checker`: SAFETY_CHECKER is not off; its default, request, loads it)."""
    sizes = {"transformer": REFERENCE_BYTES["transformer"][precision],
             "text_encoder": REFERENCE_BYTES["text_encoder"][text_encoder_precision],
             "vae": REFERENCE_BYTES["vae"]["bf16"]}
    return sizes | {"safety_checker": REFERENCE_BYTES["safety_checker"]["bf16"]} if safety_checker else sizes


@dataclass(frozen=True)
class Rooms:
    """GPU bytes left for activations beside the weights, per phase (negative: the weights alone overflow)."""

    text: int
    denoise: int
    decode: int


@dataclass(frozen=True)
class Plan:
    """A placement, the numbers that decided it, and the room it leaves each job."""

    offload: str
    fits: bool
    need_bytes: int  # peak of the base job (1 MP, one picture, one image)
    gpu_bytes: int | None
    moved_per_job_bytes: int
    reason: str
    resident_bytes: int = 0  # weights that stay on the GPU between jobs
    rooms: Rooms | None = None  # None: no GPU, no limit
    vae_tiled: bool = False
    edit_plus: bool = True
    precision: str = "bf16"  # the transformer's as planned (bf16, int8 or fp8: PRECISION=auto is planned as fp8)
    text_encoder_precision: str = "bf16"
    zero_cond_t: bool = True  # 2511's per-token gates (the larger activations when the variant is not known)

    def batch_for(self, job: JobShape) -> int:
        """Images of `job` that fit one batch (at most its num_images; 0: not even one). No GPU: all of them."""
        if self.rooms is None:
            return job.num_images
        if activations.text_bytes(job, self.text_encoder_precision) > self.rooms.text:
            return 0
        return min(job.num_images, activations.largest_batch(job, self.rooms.denoise, self.rooms.decode,
                                                             self.precision, self.vae_tiled,
                                                             self.zero_cond_t))

    def peak_bytes(self, job: JobShape, batch: int) -> dict[str, int]:
        """GPU bytes at each phase's peak for `batch` images of `job` (weights, activations and RESERVE_BYTES)."""
        rooms = self.rooms or Rooms(0, 0, 0)
        gpu = self.gpu_bytes or 0
        weights = {phase: gpu - RESERVE_BYTES - getattr(rooms, phase) for phase in PHASES}
        return {"text": weights["text"] + activations.text_bytes(job, self.text_encoder_precision) + RESERVE_BYTES,
                "denoise": weights["denoise"] + RESERVE_BYTES + activations.transformer_bytes(
                    job, batch, self.precision, self.zero_cond_t),
                "decode": weights["decode"] + RESERVE_BYTES + activations.vae_bytes(job, batch, self.vae_tiled)}

    def max_megapixels(self, pictures: int = 1) -> float | None:
        """Largest one-image job (MP, up to the API's 4 MP) with `pictures` inputs; None without a GPU."""
        if self.rooms is None:
            return None
        if activations.text_bytes(JobShape.one_image(1.0, pictures, self.edit_plus),
                                  self.text_encoder_precision) > self.rooms.text:
            return 0.0
        largest = activations.largest_megapixels(self.rooms.denoise, self.rooms.decode, self.precision,
                                                 self.vae_tiled, pictures, self.edit_plus, self.zero_cond_t)
        return min(largest, MAX_API_MEGAPIXELS)

    def batched_images(self) -> int | None:
        """Images per batch at 1 MP with one picture (up to the API's 4); None without a GPU."""
        if self.rooms is None:
            return None
        job = JobShape.one_image(1.0, edit_plus=self.edit_plus)
        return self.batch_for(JobShape(job.output_pixels, job.input_pixels, edit_plus=self.edit_plus,
                                       num_images=MAX_API_IMAGES))

    def info(self) -> dict[str, object]:
        """The job output's `model.placement` block, the load log's and the command's JSON (GB, rounded)."""
        def gb(size: int | None) -> float | None:
            return None if size is None else round(size / GB, 1)

        return {"offload": self.offload, "fits": self.fits, "need_gb": gb(self.need_bytes),
                "gpu_gb": gb(self.gpu_bytes), "resident_gb": gb(self.resident_bytes),
                "moved_per_job_gb": gb(self.moved_per_job_bytes),
                "transfer_s_per_job": round(self.moved_per_job_bytes / PCIE_BYTES_PER_SECOND, 2),
                "max_megapixels": self.max_megapixels(), "batched_images": self.batched_images(),
                "reason": self.reason}


def phase_weights(mode: str, sizes: Mapping[str, int]) -> dict[str, int]:
    """Weight bytes on the GPU while each phase runs under placement `mode`."""
    t, te, vae = (sizes.get(c, 0) for c in COMPONENTS)

    def window(name: str) -> int:
        return min(sizes.get(name, 0), STREAM_WINDOW_BYTES[name])

    weights = {
        "none": {"text": t + te + vae, "denoise": t + te + vae, "decode": t + te + vae},
        "text_encoder": {"text": t + vae + window("text_encoder"), "denoise": t + vae, "decode": t + vae},
        "model": {"text": te, "denoise": t, "decode": vae},
        "group": {"text": window("text_encoder"), "denoise": window("transformer"), "decode": window("vae")},
    }[mode]
    return {phase: size + _always(sizes) for phase, size in weights.items()}


def _always(sizes: Mapping[str, int]) -> int:
    return sum(sizes.get(name, 0) for name in ALWAYS_RESIDENT)


def resident(mode: str, sizes: Mapping[str, int]) -> int:
    """Weight bytes that stay on the GPU between jobs."""
    t, te, vae = (sizes.get(c, 0) for c in COMPONENTS)
    return {"none": t + te + vae, "text_encoder": t + vae, "model": 0, "group": 0}[mode] + _always(sizes)


def moved(mode: str, sizes: Mapping[str, int], steps: int = DEFAULT_STEPS) -> int:
    """Weight bytes crossing PCIe for one job (one batch; group offload streams the transformer every step)."""
    t, te, vae = (sizes.get(c, 0) for c in COMPONENTS)
    return {"none": 0, "text_encoder": te, "model": t + te + vae, "group": steps * t + te + vae}[mode]


def rooms(mode: str, sizes: Mapping[str, int], gpu_bytes: int) -> Rooms:
    weights = phase_weights(mode, sizes)
    return Rooms(*(gpu_bytes - RESERVE_BYTES - weights[phase] for phase in PHASES))


def need(mode: str, sizes: Mapping[str, int], job: JobShape = BASE_JOB, precision: str = "bf16",
         vae_tiled: bool = False, steps: int = DEFAULT_STEPS, text_encoder_precision: str = "bf16",
         zero_cond_t: bool = True) -> tuple[int, int]:
    """(peak GPU bytes, bytes moved to the GPU per job) of placement `mode` for component `sizes` and `job`,
    the transformer at `precision`."""
    weights = phase_weights(mode, sizes)
    peak = max(weights["text"] + activations.text_bytes(job, text_encoder_precision),
               weights["denoise"] + activations.transformer_bytes(job, 1, precision, zero_cond_t),
               weights["decode"] + activations.vae_bytes(job, 1, vae_tiled))
    return peak + RESERVE_BYTES, moved(mode, sizes, steps)


def plan(sizes: Mapping[str, int], gpu_bytes: int | None, mode: str = "auto", *, precision: str = "bf16",
         vae_tiled: bool | None = None, edit_plus: bool = True, steps: int = DEFAULT_STEPS,
         text_encoder_precision: str = "bf16", zero_cond_t: bool = True) -> Plan:
    """The placement for OFFLOAD=`mode`: as given, or (auto) the fastest that fits `gpu_bytes` with the base job.

    `sizes` are the components' bytes as they will sit in memory (after any quantisation);
    `gpu_bytes` is None without a GPU (then everything stays on the CPU, placement `none`, no job limit).
    `vae_tiled` None means MEMORY_SAVING=auto (tiled below 48 GB).  `precision` (the transformer's,
    auto counting as fp8), `text_encoder_precision` and `zero_cond_t` (the variant) choose the
    fitted activation figures.
    """
    chosen = activations.precision_of(precision)
    total = sum(sizes.values())
    if gpu_bytes is None:
        if mode in ("auto", "none"):
            return Plan("none", True, total, None, 0, "no GPU: every component runs on the CPU", total,
                        precision=chosen, text_encoder_precision=text_encoder_precision)
        return Plan(mode, False, total, None, 0, f"OFFLOAD={mode} moves weights to a GPU and there is none",
                    precision=chosen, text_encoder_precision=text_encoder_precision)
    tiled = gpu_bytes < LARGE_GPU_BYTES if vae_tiled is None else vae_tiled
    base = JobShape.one_image(1.0, edit_plus=edit_plus)

    def make(candidate: str, fits: bool, reason: str) -> Plan:
        peak, carried = need(candidate, sizes, base, chosen, tiled, steps, text_encoder_precision, zero_cond_t)
        if carried:
            reason += (f"; moves {_gb(carried)} over PCIe per job, ~{carried / PCIE_BYTES_PER_SECOND:.1f} s at "
                       f"{PCIE_BYTES_PER_SECOND / GB:.0f} GB/s (derived)")
        return Plan(candidate, fits, peak, gpu_bytes, carried, reason, resident(candidate, sizes),
                    rooms(candidate, sizes, gpu_bytes), tiled, edit_plus, chosen, text_encoder_precision, zero_cond_t)

    def peak(candidate: str) -> int:
        return need(candidate, sizes, base, chosen, tiled, steps, text_encoder_precision, zero_cond_t)[0]

    if mode != "auto":
        fits = peak(mode) <= gpu_bytes
        verdict = "fits" if fits else "does NOT fit: expect jobs to be refused; OFFLOAD=auto picks one that fits"
        return make(mode, fits, f"OFFLOAD={mode} as set; {_gb(peak(mode))} needed of {_gb(gpu_bytes)} for a 1 MP "
                                f"one-image job, {verdict}")
    for candidate in MODES:
        if peak(candidate) <= gpu_bytes:
            faster = [f"{m} needs {_gb(peak(m))}" for m in MODES[:MODES.index(candidate)]]
            why = f"; faster ones do not fit ({', '.join(faster)})" if faster else ""
            return make(candidate, True, f"fastest that fits: {_gb(peak(candidate))} needed of {_gb(gpu_bytes)} "
                                         f"for a 1 MP one-image job ({_what(candidate)}){why}")
    return make("group", False, (
        f"nothing fits: even group offload needs {_gb(peak('group'))} (weights streamed, a 1 MP one-image job) "
        f"and the GPU has {_gb(gpu_bytes)}; use a larger GPU class"))


def _what(mode: str) -> str:
    return {"none": "every component resident",
            "text_encoder": "transformer and VAE resident, text encoder streamed for each prompt",
            "model": "components moved to the GPU whole while used",
            "group": "every component streamed layer by layer, the transformer once per step"}[mode]


def _gb(size: int) -> str:
    return f"{size / GB:.1f} GB"


# ---- Reading the sizes (not pure: reads safetensors headers, never the weights) ----

FLOATS = {"F32": 4, "BF16": 2, "F16": 2}
# Weights the worker reads but drops at load, so no placement holds them (model/text_phase.py).
DROPPED = {"text_encoder": ("lm_head.",)}


def folder_bytes(folder: Path, precision: str = "bf16", component: str | None = None, held: bool = True) -> int:
    """Bytes a component's safetensors take on the GPU at `precision` (from the headers alone).

    Floating-point tensors load as bf16 (2 bytes an element).  A 2-D floating-point `.weight` (a
    linear layer's: not an embedding table, whose module's own name holds `embed`, as `embed_tokens`;
    `time_text_embed.timestep_embedder.linear_1` is a linear) that weights/precision.py quantises in
    `component` (the folder's name unless given: the text encoder's vision tower stays bf16) counts
    as torchao stores it at `precision` (precision.linear_weight_bytes: scales included).  Tensors
    already stored quantised count as stored: integer and float8 data, and every piece of a tensor
    torchao saved (`<module>._weight_qdata`, `._weight_scale`: its float32 scales stay float32 at
    load).  `held`: without the weights the worker drops at load (DROPPED: the text encoder's
    lm_head, `lm_head.weight` or, baked quantised, `lm_head._weight_*`); else every weight read.  An
    estimate made before loading; the load log gives the bytes really resident afterwards.
    """
    component = component or folder.name
    dropped = DROPPED.get(component, ()) if held else ()
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        torchao = "tensor_names" in (header.get("__metadata__") or {})  # torchao's safetensors metadata
        for name, spec in header.items():
            if name == "__metadata__" or name.startswith(dropped):
                continue
            start, end = spec["data_offsets"]
            shape, size = spec["shape"], end - start
            module, _, leaf = name.rpartition(".")
            if torchao and leaf.startswith("_"):  # a piece of a quantised tensor, loaded as stored
                pass
            elif (spec["dtype"] in FLOATS and len(shape) == 2 and leaf == "weight"
                    and "embed" not in module.rpartition(".")[2] and stored_quantised(component, name)):
                size = linear_weight_bytes(shape[0], shape[1], precision)
            elif spec["dtype"] in FLOATS:  # loaded as bf16 whatever the file stores
                size = size // FLOATS[spec["dtype"]] * 2
            total += size
    return total


def model_bytes(path: Path, precision: str, text_encoder_precision: str,
                safety_checker: Path | None = None, held: bool = True) -> dict[str, int]:
    """The three components' bytes in the diffusers folder `path`, at the precisions they will load in, and the
    safety checker's (bf16) when its folder is given; `held`: as the worker holds them (folder_bytes)."""
    precisions = {"transformer": precision, "text_encoder": text_encoder_precision, "vae": "bf16"}
    sizes = {name: folder_bytes(path / name, precisions[name], name, held) for name in COMPONENTS}
    if safety_checker is not None:
        sizes["safety_checker"] = folder_bytes(safety_checker)
    return sizes
