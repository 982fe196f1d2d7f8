"""Sizing one job against the plan: how many images a batch takes, or a clear refusal before any GPU work.

Why this exists: the plan (planner.py) keeps the transformer on the GPU with room for a 1 MP
one-image job, so a larger request must be sized when it arrives.  More images than fit one batch
run as several batches (the GPU is compute-bound, so sequential batches cost the same GPU time,
and the text is encoded once: serving/engine.py).  A job whose activations do not fit even one
image at a time is refused with a RequestError naming `input.megapixels` and the largest this
worker can do, before anything reaches the GPU: never a CUDA out-of-memory halfway through.
(Offloading more for that one job was weighed and not chosen: it would stream 20 GB per step
through PCIe for minutes while the caller can simply ask for fewer pixels, and it would change the
placement under concurrent jobs.)  Without a GPU there is no limit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import RequestError
from ..weights.variants import Variant
from . import activations
from .activations import GB, MEGAPIXEL, JobShape, transformer_bytes
from .planner import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFit:
    """How a job runs under the plan: images per batch and the number of batches."""

    batch: int
    batches: int


def job_shape(output_size: tuple[int, int], picture_sizes: Sequence[tuple[int, int]], prompt: str,
              num_images: int, edit_plus: bool) -> JobShape:
    """The JobShape of a request: output (width, height), each input picture's working (width, height)."""
    return JobShape(output_size[0] * output_size[1], tuple(w * h for w, h in picture_sizes),
                    prompt_chars=len(prompt.encode()), edit_plus=edit_plus, num_images=num_images)


def fit_job(plan: Plan, job: JobShape, adapter_bytes: int = 0) -> JobFit:
    """The batching for `job` under `plan`; RequestError (input.megapixels) when not one image fits.

    `adapter_bytes` (the job's request LoRAs and those left loaded, loras/service.py) sit on the
    GPU beside the weights for the whole job, so they come off every phase's room first.
    """
    batch = plan.batch_for(job)
    if adapter_bytes and plan.rooms is not None:
        rooms = plan.rooms
        with_loras = replace(plan, rooms=replace(rooms, text=rooms.text - adapter_bytes,
                                                 denoise=rooms.denoise - adapter_bytes,
                                                 decode=rooms.decode - adapter_bytes))
        reduced = with_loras.batch_for(job)
        if batch >= 1 and reduced < 1:  # the job alone fits: the LoRAs are what does not
            spare = min(rooms.text - activations.text_bytes(job, plan.text_encoder_precision),
                        rooms.denoise - transformer_bytes(job, 1, plan.precision, plan.zero_cond_t))
            raise RequestError("input.loras", (
                f"the request LoRAs (with those this worker keeps loaded) take ~{adapter_bytes / GB:.2f} GB of GPU "
                f"memory, and beside the weights and this job's activations there is ~{max(spare, 0) / GB:.2f} GB "
                f"(offload={plan.offload}): use fewer or lower-rank LoRAs, a smaller job, or a larger GPU class"))
        plan, batch = with_loras, reduced
    if batch >= 1:
        return JobFit(batch, math.ceil(job.num_images / batch))
    pictures = len(job.input_pixels)
    largest = plan.max_megapixels(pictures) or 0.0
    room = plan.rooms.denoise if plan.rooms is not None else 0
    asked = job.output_pixels / MEGAPIXEL
    needed = transformer_bytes(job, 1, plan.precision, plan.zero_cond_t) / GB
    raise RequestError("input.megapixels", (
        f"a {asked:.2f} MP output from {pictures} picture(s) needs ~{needed:.1f} GB of GPU memory "
        f"for one image and this worker has {max(room, 0) / GB:.1f} GB beside its weights"
        f"{f' and request LoRAs ({adapter_bytes / GB:.1f} GB)' if adapter_bytes else ''} "
        f"(offload={plan.offload}); the largest this worker can do with {pictures} picture(s) is {largest:.2f} MP: "
        "ask for a smaller megapixels (or width and height, or size), or deploy on a larger GPU class"))


def fit_request(plan: Plan, output_size: tuple[int, int], pictures: Sequence[Any], request: Any,
                variant: Variant, adapter_bytes: int = 0) -> JobFit:
    """`fit_job` for a parsed request and its loaded pictures (PIL images at their working sizes)."""
    job = job_shape(output_size, [p.size for p in pictures], request.prompt, request.num_images,
                    variant.pipeline_class != "QwenImageEditPipeline")
    fit = fit_job(plan, job, adapter_bytes)
    if fit.batches > 1:
        log.info("job runs as %d batches of up to %d image(s): %d at once do not fit beside the weights",
                 fit.batches, fit.batch, job.num_images)
    return fit
