"""Running one edit on a loaded pipeline, timed stage by stage, at the size the request asks for.

Why this exists: the pipeline call is one opaque function, but people pay for each stage of it.
The engine wraps the text encoder's forward and the VAE's encode and decode once, at start, so
every job's StageClock sees text encoding, VAE encoding, denoising (VAE encode end to the last
step's callback) and decoding where they happen.

Working size: both Qwen edit pipelines size the VAE's conditioning picture to 1024*1024 pixels
inside `__call__` (through their module-level `calculate_dimensions(1024 * 1024, ratio)`), whatever
output size is asked for.  That is a quarter of the tokens wasted at 0.25 MP.  `working_area`
maps that one target area to the job's area for the duration of the call (the EditPlus VL
encoder's own 384*384 condition size is left alone).  Calls run one at a time on the GPU
section's thread (serving/gpu_section.py, which records each job's wait as its `queue` time), so the
swap is never seen by a concurrent job; a test pins the behaviour against the installed
diffusers.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..accounting.timing import StageClock
from ..model.loaded import LoadedModel
from .gpu_section import GpuSection
from .seeds import generator_for

PIPELINE_DEFAULT_AREA = 1024 * 1024
Memo = dict[tuple[str, ...], Any]  # prompt -> the pipeline's (prompt_embeds, mask) for a job's pictures


class Editor:
    """Runs edits on one LoadedModel, one at a time."""

    def __init__(self, model: LoadedModel, section: GpuSection | None = None) -> None:
        self.model = model
        self.section = section or GpuSection()  # the worker's own, shared with jobs encoded before the load ended
        self._clock: StageClock | None = None
        self._steps_done = 0
        pipe = model.pipe
        pipe.text_encoder.forward = self._timed(pipe.text_encoder.forward, "text_encode")
        pipe.vae.encode = self._timed(pipe.vae.encode, "vae_encode", mark="vae_encode_end")
        pipe.vae.decode = self._timed(pipe.vae.decode, "decode")

    def sync(self) -> None:
        """Wait for the GPU so a clock reading includes the work already queued."""
        if self.model.device == "cuda":
            torch.cuda.synchronize()

    def edit(self, pictures: list[Image.Image], *, prompt: str, negative_prompt: str, true_cfg_scale: float,
             steps: int, size: tuple[int, int], seeds: list[int], clock: StageClock,
             on_step: Callable[[int, int], None] | None = None, batch: int | None = None,
             around: AbstractContextManager[None] | None = None, encoded: Memo | None = None) -> np.ndarray:
        """Edit `pictures`; return (len(seeds), H, W, 3) uint8 pixels.

        `batch` images at most go through the pipeline at once (placement/jobs.py sizes it to the GPU
        memory left); more run as several calls, the prompt encoded once.  Each image has its own
        generator, so its pixels do not depend on how the job was split.  `around` wraps the pipeline
        calls inside the GPU section (the job's request LoRAs, loras/service.py).  `encoded`: the
        prompts already encoded for these pictures (serving/early_text.py), used instead of encoding.
        """
        width, height = size
        generators = [generator_for(seed) for seed in seeds]  # every bit of a 64-bit seed counts
        use_cfg = true_cfg_scale > 1.0
        per_call = max(1, min(batch or len(seeds), len(seeds)))
        chunks = [generators[i:i + per_call] for i in range(0, len(generators), per_call)]
        total_steps = steps * len(chunks)
        done_before = 0

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            # Inside the denoising loop: no wait for the GPU (a clock reading synchronises), so the steps queue
            # back to back; progress is told as each step is queued.  The last step's reading ends `denoise`.
            if index + 1 == steps:
                clock.mark("last_step")
            self._steps_done = index + 1
            if on_step is not None:
                on_step(done_before + index + 1, total_steps)
            return {}

        def call(chunk: list[torch.Generator]) -> Any:
            output = self.model.pipe(
                image=pictures if len(pictures) > 1 else pictures[0],
                prompt=prompt,
                negative_prompt=negative_prompt if use_cfg else None,
                true_cfg_scale=true_cfg_scale,
                height=height,
                width=width,
                num_inference_steps=steps,
                num_images_per_prompt=len(chunk),
                generator=chunk,
                output_type="pt",
                callback_on_step_end=step_end,
            )
            start = clock.marks.get("vae_encode_end", clock.started)
            clock.add("denoise", clock.marks.get("last_step", start) - start)
            return output.images

        def run() -> Any:
            nonlocal done_before
            images = []
            with (around or nullcontext(), self._bound(clock), working_area(self.model.pipe, width * height),
                  encoded_once(self.model.pipe, encoded)):
                for chunk in chunks:
                    images.append(call(chunk))
                    done_before += steps
            return torch.cat(images)

        images = self.section.run(clock, run)
        with clock.stage("outputs"):
            pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
            return pixels.cpu().numpy()

    def warm_up(self, size: tuple[int, int]) -> None:
        """Throw-away single-step edits at `size` that compile what COMPILE=regional marked.

        Two prompts of different lengths: the first compiles for one text length, the second makes
        torch.compile mark the text length dynamic, so later prompts of any length reuse the graph.
        """
        grey = Image.new("RGB", size, (128, 128, 128))
        for prompt in ("warm up", "warm up the compiled transformer blocks with a longer prompt, " * 3):
            self.edit([grey], prompt=prompt, negative_prompt="", true_cfg_scale=1.0, steps=1, size=size, seeds=[0],
                      clock=StageClock(self.sync))

    @contextmanager
    def _bound(self, clock: StageClock) -> Iterator[None]:
        self._clock = clock
        try:
            yield
        finally:
            self._clock = None

    def _timed(self, method: Callable[..., Any], stage: str, mark: str | None = None) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            clock = self._clock
            if clock is None:
                return method(*args, **kwargs)
            with clock.stage(stage):
                result = method(*args, **kwargs)
            if mark:
                clock.mark(mark)
            return result

        return timed


@contextmanager
def working_area(pipe: Any, area: int) -> Iterator[None]:
    """Make `pipe` size its VAE conditioning pictures to `area` pixels instead of 1024*1024."""
    module = sys.modules[_pipeline_module(pipe)]
    original = module.calculate_dimensions

    def sized(target_area: float, ratio: float) -> Any:
        return original(area if target_area == PIPELINE_DEFAULT_AREA else target_area, ratio)

    module.calculate_dimensions = sized
    try:
        yield
    finally:
        module.calculate_dimensions = original


@contextmanager
def encoded_once(pipe: Any, memo: Memo | None = None) -> Iterator[None]:
    """Within the block, the pipeline encodes each distinct prompt once (later batches of a job reuse it).

    Wraps the instance's `_get_qwen_prompt_embeds(prompt, image, device)`, which both Qwen edit
    pipelines call for the prompt (and the negative prompt under CFG) before repeating the result
    num_images_per_prompt times; the pictures are the same for every batch of a job, so the key
    is the prompt alone.  `memo`: prompts encoded before (for the same pictures), filled in place.
    """
    original = pipe._get_qwen_prompt_embeds
    own = vars(pipe).get("_get_qwen_prompt_embeds")  # an instance-level override to put back, if any
    memo = {} if memo is None else memo

    def once(prompt: Any = None, *args: Any, **kwargs: Any) -> Any:
        key = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        if key not in memo:
            memo[key] = original(prompt, *args, **kwargs)
        return memo[key]

    pipe._get_qwen_prompt_embeds = once
    try:
        yield
    finally:
        if own is None:
            del pipe._get_qwen_prompt_embeds  # back to the class's method
        else:
            pipe._get_qwen_prompt_embeds = own


def _pipeline_module(pipe: Any) -> str:
    """The diffusers module whose `__call__` the pipeline runs (subclasses included)."""
    for cls in type(pipe).__mro__:
        if "__call__" in vars(cls) and hasattr(sys.modules[cls.__module__], "calculate_dimensions"):
            return cls.__module__
    raise TypeError(f"{type(pipe).__name__} does not size its inputs with calculate_dimensions")
