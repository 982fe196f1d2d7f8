"""How much GPU memory one job's activations take: a function of its tokens and its batch.

Why this exists: the placement used to reserve room for the largest job the API allows (2 MP,
num_images 4, ~8 GB), which pushed the 24 GB class into streaming the transformer for every
step.  Planning for a job-sized estimate instead lets the transformer stay on the GPU, and the
same estimate tells each job how many of its images fit one batch (or that none does).

Tokens (the transformer's joint sequence, per image of the batch):
- output: (W/8/2) x (H/8/2) = W*H/256 (the VAE's factor 8, then 2x2 patches);
- each VAE conditioning picture at its working size: w*h/256 (Edit: the first picture only);
- text: the prompt template and prompt (about 3 bytes of prompt a token), plus the VL encoder's
  vision tokens, one per 28x28 pixels (14-pixel patches merged 2x2): EditPlus gives it each
  picture at 384x384 (188 tokens), Edit the first picture at its working size.

Transformer (facts.md section 6: hidden D = 3072, 60 dual-stream blocks, 24 heads x 128, MLP 4x).
Blocks run one after another and each frees its intermediates, so the peak is one block's, not
60.  Inside a block, per token, in bf16 (2 bytes an element), what is alive at once:
- attention phase: residual stream D, its normalised and modulated copy D, q/k/v 3D, q/k with
  RoPE applied 2D, attention output D: 8D.  The attention matrix itself (24 x N x N) is never
  materialised by SDPA's flash / memory-efficient kernels, which the `native` backend uses on
  CUDA for bf16 (the `_native_math` backend would add 48 N^2 bytes and is not planned for);
- MLP phase (dominant): residual D, attention-updated residual D, modulated input D, the 4D
  up-projection, the 4D GELU output, the down-projection's output D: 12D.
So 12 x 3072 x 2 = 73,728 bytes a token.  int8/fp8 (torchao dynamic activation quantisation)
adds a 1-byte copy of each linear layer's input; the largest is the down-projection's 4D input:
+4 x 3072 = 12,288 bytes a token.  Batch b multiplies the token count by b.  Plus a fixed
~0.2 GB per job (latents, conditioning latents, RoPE tables, the scheduler's copies).

VAE (base 96 channels, dim_mult 1,2,4,4): the decoder's last stage runs at full resolution,
where the upsampled 192-channel tensor, the 96-channel convolution outputs and the causal-conv
caches meet: ~1,500 bytes a pixel in bf16 (~1.6 GB at 1 MP), per picture decoded together.  With
MEMORY_SAVING (slicing and tiling, on by default below 48 GB) pictures decode one at a time in
256x256 tiles, a bounded ~0.25 GB whatever the size.

Text encoder (Qwen2.5-VL, 8.3 B): a few hundred tokens through 28 layers of 3584: ~0.1 GB.

Every constant here is DERIVED from the shapes, not measured.  When a GPU is lent, measured peaks
(`torch.cuda.max_memory_allocated` around a job on the real shapes at 0.5, 1 and 2 MP, num_images
1 and 4, int8/fp8 transformer resident) are to replace them; until then the plan keeps
RESERVE_BYTES (planner.py) between the estimate and an out-of-memory error.
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
TRANSFORMER_BYTES_PER_TOKEN = 12 * HIDDEN * 2  # derived (module docstring)
QUANTISED_BYTES_PER_TOKEN = 4 * HIDDEN  # int8/fp8: the 1-byte copy of the MLP down-projection's input
JOB_FIXED_BYTES = int(0.2 * GB)
VAE_BYTES_PER_PIXEL = 1500  # derived: the decoder's full-resolution stage
VAE_TILED_BYTES = int(0.25 * GB)  # derived: one 256x256 tile at a time
TEXT_ENCODER_ACTIVATION_BYTES = int(0.1 * GB)


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

    def text_tokens(self) -> int:
        vision = (len(self.input_pixels) * EDIT_PLUS_CONDITION_PIXELS if self.edit_plus
                  else self.input_pixels[0] if self.input_pixels else 0) // VISION_TOKEN_PIXELS
        return TEMPLATE_TOKENS + math.ceil(self.prompt_chars / PROMPT_BYTES_PER_TOKEN) + vision

    def tokens(self) -> int:
        """The transformer's sequence length for one image of the job (image tokens plus text)."""
        conditioning = self.input_pixels if self.edit_plus else self.input_pixels[:1]
        return (self.output_pixels + sum(conditioning)) // TOKEN_PIXELS + self.text_tokens()


# The job every plan must hold with the transformer where the plan puts it: 1 MP, one picture, one image.
BASE_JOB = JobShape.one_image(1.0)


def transformer_bytes(job: JobShape, batch: int, quantised: bool) -> int:
    """Peak activation bytes of one transformer pass over `batch` images of `job`."""
    per_token = TRANSFORMER_BYTES_PER_TOKEN + (QUANTISED_BYTES_PER_TOKEN if quantised else 0)
    return job.tokens() * batch * per_token + JOB_FIXED_BYTES


def vae_bytes(job: JobShape, batch: int, tiled: bool) -> int:
    """Peak activation bytes of the VAE for `batch` images of `job` (the larger of encode and decode)."""
    if tiled:
        return VAE_TILED_BYTES
    largest = max((job.output_pixels, *job.input_pixels))
    return largest * VAE_BYTES_PER_PIXEL * batch


def largest_batch(job: JobShape, transformer_room: int, vae_room: int, quantised: bool, tiled: bool) -> int:
    """How many images of `job` fit one batch in the rooms left beside the weights (0: not even one)."""
    per_image = job.tokens() * (TRANSFORMER_BYTES_PER_TOKEN + (QUANTISED_BYTES_PER_TOKEN if quantised else 0))
    batch = max(0, (transformer_room - JOB_FIXED_BYTES) // per_image) if per_image else 0
    if tiled:
        return int(batch) if vae_bytes(job, 1, True) <= vae_room else 0
    per_picture = vae_bytes(job, 1, False)
    return int(min(batch, vae_room // per_picture))


def largest_megapixels(transformer_room: int, vae_room: int, quantised: bool, tiled: bool, pictures: int = 1,
                       edit_plus: bool = True) -> float:
    """The largest output (MP) of a one-image job with `pictures` inputs of the same area that fits the rooms."""
    def fits(mp: float) -> bool:
        return largest_batch(JobShape.one_image(mp, pictures, edit_plus), transformer_room, vae_room, quantised,
                             tiled) >= 1

    low, high = 0.0, 64.0
    if not fits(1 / 256):
        return 0.0
    for _ in range(40):  # bisection to well under 0.01 MP
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return math.floor(low * 100) / 100
