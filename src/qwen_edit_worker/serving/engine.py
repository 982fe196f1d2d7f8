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
from ..model.loader import LoadedModel
from .gpu_section import GpuSection

PIPELINE_DEFAULT_AREA = 1024 * 1024


class Editor:
    """Runs edits on one LoadedModel, one at a time."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.section = GpuSection()
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
             on_step: Callable[[int, int], None] | None = None,
             around: AbstractContextManager[None] | None = None) -> np.ndarray:
        """Edit `pictures`; return (len(seeds), H, W, 3) uint8 pixels.

        `around` wraps the pipeline call inside the GPU section (the job's request LoRAs, loras/service.py).
        """
        width, height = size
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        use_cfg = true_cfg_scale > 1.0

        def step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            clock.mark("last_step")
            self._steps_done = index + 1
            if on_step is not None:
                on_step(index + 1, steps)
            return {}

        def run() -> Any:
            with around or nullcontext(), self._bound(clock), working_area(self.model.pipe, width * height):
                output = self.model.pipe(
                    image=pictures if len(pictures) > 1 else pictures[0],
                    prompt=prompt,
                    negative_prompt=negative_prompt if use_cfg else None,
                    true_cfg_scale=true_cfg_scale,
                    height=height,
                    width=width,
                    num_inference_steps=steps,
                    num_images_per_prompt=len(seeds),
                    generator=generators,
                    output_type="pt",
                    callback_on_step_end=step_end,
                )
            start = clock.marks.get("vae_encode_end", clock.started)
            clock.add("denoise", clock.marks.get("last_step", start) - start)
            return output

        output = self.section.run(clock, run)
        with clock.stage("outputs"):
            pixels = (output.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
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


def _pipeline_module(pipe: Any) -> str:
    """The diffusers module whose `__call__` the pipeline runs (subclasses included)."""
    for cls in type(pipe).__mro__:
        if "__call__" in vars(cls) and hasattr(sys.modules[cls.__module__], "calculate_dimensions"):
            return cls.__module__
    raise TypeError(f"{type(pipe).__name__} does not size its inputs with calculate_dimensions")
