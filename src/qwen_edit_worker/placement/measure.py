"""The real-shape harness: a job's peak GPU bytes and FLOPs per phase, measured on fake CUDA.

Why this exists: the planner's activation model (placement/activations.py) decides which jobs a
worker admits, so its numbers must come from the real model's graph, not from counting by hand.
This runs each phase of a job the way the pipelines do, on the real components built from their
real configs on fake tensors (placement/fakecuda.py), and counts the bytes alive beyond the
weights (placement/memcount.py) and the FLOPs:
- `text`: the Qwen2.5-VL language model over the prompt template, the prompt and the pictures'
  vision tokens, as the worker calls it (model/text_phase.py: the last hidden state only, no
  lm_head, no logits, no key/value cache);
- `encode`: the VAE encoding each picture at its working size (one at a time, as the pipelines do);
- `denoise`: one transformer pass over the batch (output latents + every conditioning picture's
  latents + the prompt embeddings), the latents and conditioning kept alive beside it;
- `decode`: the VAE decoding the batch (`tiled`: MEMORY_SAVING's slicing and tiling).
The transformer is built with 2 blocks (one block is alive at a time: 2 give the peak of 60,
tests/test_fakecuda.py); its FLOPs are 1 block's plus 59 times the second's.

`python -m qwen_edit_worker.placement.measure --variant edit-2511 --megapixels 1 --pictures 1
--images 1 --precision int8` prints the phases as JSON.  What this cannot see (a GPU can):
allocator fragmentation and the CUDA context (RESERVE_BYTES covers them), the kernel torch picks
at run time, and the offload placements' streaming (text_encoder, model, group need CUDA streams).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..weights.variants import VARIANTS
from . import fakecuda, memcount
from .activations import MEGAPIXEL, JobShape

TEMPLATE_HEAD = 64  # prompt_template_encode_start_idx: encoded, then dropped before the transformer
BLOCKS = 60
TEXT_LAYERS = 28
PRECISIONS = ("bf16", "int8", "fp8")


@dataclass(frozen=True)
class Job:
    """One job, as the harness runs it."""

    variant: str = "edit-2511"
    megapixels: float = 1.0
    pictures: int = 1
    images: int = 1
    prompt_tokens: int = 67  # ~200 bytes of prompt
    precision: str = "bf16"
    text_encoder_precision: str = "bf16"
    tiled: bool = False

    def shape(self) -> JobShape:
        edit_plus = VARIANTS[self.variant].pipeline_class != "QwenImageEditPipeline"
        area = latent_area(self.megapixels)
        return JobShape(area, (area,) * self.pictures, prompt_chars=self.prompt_tokens * 3, edit_plus=edit_plus,
                        num_images=self.images)


@dataclass(frozen=True)
class Phase:
    """A phase's peak bytes alive beyond the weights, and its FLOPs."""

    peak_bytes: int
    flops: int


def latent_area(megapixels: float) -> int:
    """A square output of `megapixels` at the worker's sizing (sides multiples of 16: whole 2x2 patches)."""
    side = max(16, round(math.sqrt(megapixels * MEGAPIXEL) / 16) * 16)
    return side * side


def _side(area: int) -> int:
    return int(math.isqrt(area))


def _counted(run: Any, flops: bool = True) -> Phase:
    """`run`'s peak alive bytes, and its FLOPs (torch's counter cannot see torchao's int8 operator: bf16 only)."""
    counter = memcount.flop_counter() if flops else contextlib.nullcontext()
    with torch.no_grad(), memcount.PeakMemory() as memory, counter:
        run()
    return Phase(memory.peak, int(counter.get_total_flops()) if flops else 0)


def text_phase(job: JobShape, precision: str) -> Phase:
    """The text encoder's language model over the whole prompt sequence, its last hidden state kept.

    As the worker calls it (model/text_phase.py): the template head, the prompt and each picture's
    vision tokens, the last hidden state only (no lm_head, no logits, no key/value cache).  Measured
    with 2 and 3 layers and extended to the real 28 (tests/test_activations_grid.py checks 4 against
    the line: with one hidden state alive at a time the layers add nothing).  The vision tower
    itself is not run here: its window attention splits by data-dependent lengths, which fake
    tensors cannot give (activations.py adds the tower's own activations from its shapes).
    """
    two, three = (_text_layers(job, precision, layers) for layers in (2, 3))
    return Phase(two.peak_bytes + (TEXT_LAYERS - 2) * (three.peak_bytes - two.peak_bytes),
                 two.flops + (TEXT_LAYERS - 2) * (three.flops - two.flops))


def _worker_matmul() -> None:
    """int8 through the worker's own matmul, installed as its loader does (weights/int8_mm.py): what a GPU runs.
    torchao's own takes a fake-tensor shortcut that skips the weight copy and the few-row fallback a GPU makes."""
    from ..weights import int8_mm

    int8_mm.install()


def _text_layers(job: JobShape, precision: str, layers: int) -> Phase:
    length = TEMPLATE_HEAD + job.text_tokens()
    _worker_matmul()
    with fakecuda.fake_cuda():
        encoder = fakecuda.text_encoder(precision, layers)

        def run() -> None:
            embeds = encoder.get_input_embeddings()(torch.zeros(1, length, dtype=torch.long))
            positions = torch.zeros(3, 1, length, dtype=torch.long)
            # model/text_phase.py's call, below the vision tower: no hidden states kept, no cache, no head
            out = encoder.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=None,
                                               use_cache=False)
            del embeds
            kept = out.last_hidden_state[:, TEMPLATE_HEAD:].contiguous()
            del out, kept

        return _counted(run, precision == "bf16")


def encode_phase(job: JobShape, tiled: bool, flops: bool = True) -> Phase:
    """The VAE encoding each conditioning picture (one at a time; the latents stay alive)."""
    pictures = job.input_pixels if job.edit_plus else job.input_pixels[:1]
    with fakecuda.fake_cuda():
        vae = fakecuda.vae(tiled)

        def run() -> None:
            kept = []
            for area in pictures:
                side = _side(area)
                image = torch.zeros(1, 3, 1, side, side, dtype=torch.bfloat16)
                kept.append(vae.encode(image).latent_dist.mode())
                del image

        return _counted(run, flops)


def denoise_phase(job: JobShape, batch: int, precision: str, zero_cond_t: bool, flops: bool = True) -> Phase:
    """One transformer pass over `batch` images (with the latents the loop keeps alive); FLOPs of 60 blocks."""
    output = _side(job.output_pixels) // 16
    pictures = [_side(a) // 16 for a in (job.input_pixels if job.edit_plus else job.input_pixels[:1])]
    tokens = output * output + sum(p * p for p in pictures)
    text = job.text_tokens()
    phases = []
    _worker_matmul()
    for layers in ((1, 2) if flops else (2,)):
        with fakecuda.fake_cuda():
            model = fakecuda.transformer(zero_cond_t, precision, layers)

            def run(model: Any = model) -> None:
                latents = torch.zeros(batch, output * output, 64, dtype=torch.bfloat16)
                conditioning = torch.zeros(batch, tokens - output * output, 64, dtype=torch.bfloat16)
                prompt = torch.zeros(batch, text, 3584, dtype=torch.bfloat16)
                model_input = torch.cat([latents, conditioning], dim=1)
                shapes = [[(1, output, output), *((1, p, p) for p in pictures)]] * batch
                noise = model(hidden_states=model_input, timestep=torch.full((batch,), 0.5), guidance=None,
                              encoder_hidden_states=prompt, encoder_hidden_states_mask=None, img_shapes=shapes,
                              return_dict=False)[0][:, :output * output]
                del model_input
                latents = latents + noise * 0.1  # the scheduler's step
                del noise

            phases.append(_counted(run, flops and precision == "bf16"))
    if len(phases) == 1:
        return phases[0]
    one, two = phases
    return Phase(two.peak_bytes, one.flops + (BLOCKS - 1) * (two.flops - one.flops))


def decode_phase(job: JobShape, batch: int, tiled: bool, flops: bool = True) -> Phase:
    """The VAE decoding `batch` output latents (sliced one at a time when `tiled`)."""
    side = _side(job.output_pixels) // 8
    with fakecuda.fake_cuda():
        vae = fakecuda.vae(tiled)

        def run() -> None:
            latents = torch.zeros(batch, 16, 1, side, side, dtype=torch.bfloat16)
            image = vae.decode(latents, return_dict=False)[0][:, :, 0]
            del image

        return _counted(run, flops)


@functools.lru_cache(maxsize=4096)
def measure(job: Job, batch: int | None = None) -> dict[str, Phase]:
    """Every phase of `job` at `batch` images at once (default: all its images)."""
    if job.precision not in PRECISIONS or job.text_encoder_precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    batch = job.images if batch is None else batch
    if job.precision != "bf16" or job.text_encoder_precision != "bf16":  # FLOPs: the same arithmetic in bf16
        flops = measure(replace(job, precision="bf16", text_encoder_precision="bf16"), batch)
        measured = measure_peaks(job, batch)
        return {k: Phase(v.peak_bytes, flops[k].flops) for k, v in measured.items()}
    return measure_peaks(job, batch)


def measure_peaks(job: Job, batch: int) -> dict[str, Phase]:
    """Every phase's peak (FLOPs too where the job is bf16)."""
    shape = job.shape()
    zero_cond_t = VARIANTS[job.variant].zero_cond_t
    return {"text": text_phase(shape, job.text_encoder_precision), "encode": encode_phase(shape, job.tiled),
            "denoise": denoise_phase(shape, batch, job.precision, zero_cond_t),
            "decode": decode_phase(shape, batch, job.tiled)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_edit_worker.placement.measure",
                                     description="Measure a job's peak GPU bytes and FLOPs per phase on fake CUDA.")
    parser.add_argument("--variant", choices=list(VARIANTS), default="edit-2511")
    parser.add_argument("--megapixels", type=float, default=1.0)
    parser.add_argument("--pictures", type=int, default=1)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=67)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--text-encoder-precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--tiled", action="store_true", help="MEMORY_SAVING on: VAE slicing and tiling")
    args = parser.parse_args(argv)
    if not 0 < args.megapixels <= 16 or not 1 <= args.pictures <= 3 or not 1 <= args.images <= 16 \
            or args.prompt_tokens < 0:
        print("--megapixels in (0, 16], --pictures 1 to 3, --images 1 to 16, --prompt-tokens >= 0", file=sys.stderr)
        return 2
    job = Job(args.variant, args.megapixels, args.pictures, args.images, args.prompt_tokens, args.precision,
              args.text_encoder_precision, args.tiled)
    phases = measure(job)
    print(json.dumps({"job": asdict(job), "tokens": job.shape().tokens(),
                      "peak_gb": {k: round(v.peak_bytes / 1e9, 3) for k, v in phases.items()},
                      "tflop": {k: round(v.flops / 1e12, 2) for k, v in phases.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
