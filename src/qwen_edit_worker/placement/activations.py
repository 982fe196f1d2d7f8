"""How much GPU memory one job's activations take: a function of its tokens and its batch.

Why this exists: the placement used to reserve room for the largest job the API allows (2 MP,
num_images 4, ~8 GB), which pushed the 24 GB class into streaming the transformer for every
step.  Planning for a job-sized estimate instead lets the transformer stay on the GPU, and the
same estimate tells each job how many of its images fit one batch (or that none does).

Tokens (the transformer's joint sequence, per image of the batch):
- output: (W/8/2) x (H/8/2) = W*H/256 (the VAE's factor 8, then 2x2 patches);
- each VAE conditioning picture at its working size: w*h/256 (Edit: the first picture only);
- text: the prompt template and prompt (about 3 bytes of prompt a token), plus the VL encoder's
  vision tokens, one per 28x28 pixels (14-pixel patches merged 2x2, each side rounded to 28 as
  the processor does): EditPlus gives it each picture at 384x384 (392x392: 196 tokens), Edit the
  first picture at its working size.

Every number below is FITTED to the real model's graph, measured by the harness
(`python -m qwen_edit_worker.placement.measure`, placement/measure.py: the real components built
from their configs on fake CUDA, flash attention, torchao's int8/fp8 paths, bytes alive counted
per op), and `tests/test_activations_grid.py` replays the harness over a grid of jobs and fails if
any estimate here is below the measured peak.  Peaks are linear in tokens x batch (flash attention
keeps no N x N matrix; one block is alive at a time), so a slope per image token and per text
token fits each (precision, variant) exactly; MARGIN (5%) and the fixed bytes sit on top.
- Transformer (denoise): bytes per image token of the batch, per text token of the batch, by
  precision and by `zero_cond_t` (2511 keeps per-token gates: +12 KB a token).  int8 and fp8 add
  torchao's activation copies: int8 +74 KB, fp8 +135 KB a token over bf16 (float32 copies of the
  MLP's wide input).  At 1 MP with one picture (8,519 tokens): 2509 bf16 0.78 GB, 2511 bf16 0.88,
  2511 int8 1.48, 2511 fp8 1.99 GB measured.
- Text encoder: its language model over the whole sequence (the 64-token template head included),
  hidden states only (model/text_phase.py: no lm_head, no logits, no key/value cache, one layer's
  activations alive at a time), per token.  The vision tower is not run by the harness
  (data-dependent splits); its allowance is DERIVED from its shapes (VISION_BYTES_PER_TOKEN).
- VAE: the untiled decoder keeps its causal-conv caches at full resolution, DECODE bytes a pixel a
  picture decoded together; the untiled encoder, ENCODE bytes a pixel of the largest picture (one
  at a time).  Tiled (MEMORY_SAVING: slicing and tiling), a fixed part plus a small per-pixel part
  (the output picture and the rows being blended).
What only a GPU can show: allocator fragmentation and the CUDA context (RESERVE_BYTES in
planner.py), the kernels chosen at run time, and the offload placements' streaming.
Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1000**3
MEGAPIXEL = 1024 * 1024  # as pictures/sizing.py: the pipelines' own 1 MP
HIDDEN = 3072
TOKEN_PIXELS = 16 * 16  # output and conditioning latents: VAE factor 8, 2x2 patches
VISION_TOKEN_PIXELS = 28 * 28  # Qwen2.5-VL: 14-pixel patches merged 2x2
EDIT_PLUS_CONDITION_PIXELS = 384 * 384  # EditPlus's CONDITION_IMAGE_SIZE
TEMPLATE_TOKENS = 64  # the prompt template around the prompt
PROMPT_BYTES_PER_TOKEN = 3
PRECISION_NAMES = ("bf16", "int8", "fp8")
MARGIN = 1.05  # on every fitted figure
# Measured slopes (bytes a token), rounded up: (precision, zero_cond_t) -> (per image token, per text token).
DENOISE_BYTES_PER_TOKEN = {
    ("bf16", False): (93_440, 37_888), ("bf16", True): (105_800, 37_888),
    ("int8", False): (167_200, 37_888), ("int8", True): (179_500, 37_888),
    ("fp8", False): (228_700, 37_888), ("fp8", True): (241_000, 37_888),
}
JOB_FIXED_BYTES = int(0.05 * GB)  # latents, RoPE tables, the scheduler's copies (measured within the slopes)
# Fitted: the whole encoder sequence, hidden states only (model/text_phase.py: one layer's activations alive at a
# time, no logits, no key/value cache; measured from 324 to 5,524 tokens).  bf16: one layer's MLP and attention;
# int8 adds the activations' int8 copies and int32 products; fp8 its float8 copies and scales.  (With the whole
# model's call, 29 hidden states and every token's logits, it was 512 KB a token in bf16 and 1.43 MB in int8.)
TEXT_BYTES_PER_TOKEN = {"bf16": 142_900, "int8": 222_300, "fp8": 313_400}
# Fitted: fixed bytes over the slope.  int8 through the worker's matmul (weights/int8_mm.py, as on a GPU): each
# linear's transposed weight is made contiguous for cuBLAS and few-row calls fall back to float32: up to ~0.05 GB
# (the largest linear is now an MLP's, 68 M weights: the lm_head's 545 M no longer runs).
TEXT_FIXED_BYTES = {"bf16": 0, "int8": int(0.05 * GB), "fp8": 0}
VISION_BYTES_PER_TOKEN = 4 * (3420 * 2 + 1280 * 4) * 2  # derived: 4 patches a token, MLP and residuals, bf16
VAE_DECODE_BYTES_PER_PIXEL = 3_460  # fitted: 3.63 GB at 1 MP, 14.5 GB at 4 MP
VAE_ENCODE_BYTES_PER_PIXEL = 1_934  # fitted: 2.03 GB at 1 MP
VAE_TILED_FIXED_BYTES = int(0.25 * GB)  # fitted
VAE_TILED_BYTES_PER_PIXEL = 50  # fitted


def precision_of(precision: str) -> str:
    """A precision the fitted figures know: `auto` counts as fp8, the larger of int8 and fp8."""
    return "fp8" if precision == "auto" else precision


@dataclass(frozen=True)
class JobShape:
    """What decides a job's activations: its output area, its pictures' working areas, text, images."""

    output_pixels: int
    input_pixels: tuple[int, ...]  # each picture's VAE working area (w*h)
    prompt_chars: int = 200
    edit_plus: bool = True  # QwenImageEditPlusPipeline (2509/2511): every picture conditions; else Edit
    num_images: int = 1

    @classmethod
    def one_image(cls, megapixels: float, pictures: int = 1, edit_plus: bool = True) -> JobShape:
        """A one-image job of `megapixels` output with `pictures` inputs of the same area (the worker's sizing)."""
        area = int(megapixels * MEGAPIXEL)
        return cls(area, (area,) * pictures, edit_plus=edit_plus)

    def vision_tokens(self) -> int:
        """The VL encoder's vision tokens: each picture resized to multiples of 28 pixels (its processor)."""
        areas = (EDIT_PLUS_CONDITION_PIXELS,) * len(self.input_pixels) if self.edit_plus else self.input_pixels[:1]
        return sum(max(28, round(math.isqrt(a) / 28) * 28) ** 2 // VISION_TOKEN_PIXELS for a in areas)

    def text_tokens(self) -> int:
        return TEMPLATE_TOKENS + math.ceil(self.prompt_chars / PROMPT_BYTES_PER_TOKEN) + self.vision_tokens()

    def tokens(self) -> int:
        """The transformer's sequence length for one image of the job (image tokens plus text)."""
        conditioning = self.input_pixels if self.edit_plus else self.input_pixels[:1]
        return (self.output_pixels + sum(conditioning)) // TOKEN_PIXELS + self.text_tokens()


# The job every plan must hold with the transformer where the plan puts it: 1 MP, one picture, one image.
BASE_JOB = JobShape.one_image(1.0)


def _per_image(job: JobShape, precision: str, zero_cond_t: bool) -> float:
    image, text = DENOISE_BYTES_PER_TOKEN[(precision_of(precision), zero_cond_t)]
    return (job.tokens() - job.text_tokens()) * image + job.text_tokens() * text


def transformer_bytes(job: JobShape, batch: int, precision: str, zero_cond_t: bool = True) -> int:
    """Peak activation bytes of one transformer pass over `batch` images of `job` at the transformer's precision."""
    return int(_per_image(job, precision, zero_cond_t) * batch * MARGIN) + JOB_FIXED_BYTES


def text_bytes(job: JobShape, precision: str = "bf16") -> int:
    """Peak activation bytes of the text phase (the encoder's sequence: template head, prompt, vision tokens)."""
    name = precision_of(precision)
    return int(((64 + job.text_tokens()) * TEXT_BYTES_PER_TOKEN[name] + job.vision_tokens() * VISION_BYTES_PER_TOKEN)
               * MARGIN) + TEXT_FIXED_BYTES[name]


def vae_bytes(job: JobShape, batch: int, tiled: bool) -> int:
    """Peak activation bytes of the VAE: the larger of encoding the pictures and decoding `batch` images."""
    largest = max((job.output_pixels, *job.input_pixels))
    if tiled:
        return int((VAE_TILED_FIXED_BYTES + largest * VAE_TILED_BYTES_PER_PIXEL * batch) * MARGIN)
    encode = max(job.input_pixels, default=0) * VAE_ENCODE_BYTES_PER_PIXEL
    return int(max(encode, job.output_pixels * VAE_DECODE_BYTES_PER_PIXEL * batch) * MARGIN)


def largest_batch(job: JobShape, transformer_room: int, vae_room: int, precision: str, tiled: bool,
                  zero_cond_t: bool = True) -> int:
    """How many images of `job` fit one batch in the rooms left beside the weights (0: not even one)."""
    batch = 0
    while batch < 64 and transformer_bytes(job, batch + 1, precision, zero_cond_t) <= transformer_room \
            and vae_bytes(job, batch + 1, tiled) <= vae_room:
        batch += 1
    return batch


def largest_megapixels(transformer_room: int, vae_room: int, precision: str, tiled: bool, pictures: int = 1,
                       edit_plus: bool = True, zero_cond_t: bool = True) -> float:
    """The largest output (MP) of a one-image job with `pictures` inputs of the same area that fits the rooms."""
    def fits(mp: float) -> bool:
        return largest_batch(JobShape.one_image(mp, pictures, edit_plus), transformer_room, vae_room, precision,
                             tiled, zero_cond_t) >= 1

    low, high = 0.0, 64.0
    if not fits(1 / 256):
        return 0.0
    for _ in range(40):  # bisection to well under 0.01 MP
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return math.floor(low * 100) / 100
