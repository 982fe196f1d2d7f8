"""A cold job's prompt encoded while the transformer is still being read.

Why this exists: with little traffic nearly every job meets a cold start, and the load reads the
text encoder first (model/sequence.py), so the waiting job's text phase (0.3 to 0.9 s on a GPU)
need not wait for the 20 to 41 GB transformer behind it.  Once the load publishes its text stage
(the pipeline without its transformer, its text encoder where it runs), `prompt_embeddings` runs
the pipeline's own `__call__` on the job's pictures up to the point where the prompts are encoded,
and stops it there (the transformer is not touched), so the pictures are sized and the prompt
templated by diffusers' own code, exactly as the later call would.  The encodings are what that
later call's `_get_qwen_prompt_embeds` would return; serving/engine.py's `encoded_once` takes them
as already computed, so the job's pixels are the same as if it had waited (tests/test_coldstart_jobs.py).
The work runs in the worker's GPU section, so it never overlaps another job's.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from PIL import Image

from ..accounting.timing import StageClock
from .engine import Memo, encoded_once, working_area


class _Encoded(Exception):
    """Raised inside the pipeline's call once every prompt is encoded: nothing after it runs."""


def prompt_embeddings(pipe: Any, pictures: list[Image.Image], prompt: str, negative_prompt: str,
                      true_cfg_scale: float, size: tuple[int, int], clock: StageClock) -> Memo:
    """The job's prompt (and, under CFG, its negative prompt) encoded by `pipe` for `pictures` at `size`."""
    width, height = size
    use_cfg = true_cfg_scale > 1.0
    memo: Memo = {}
    wanted, done = (2 if use_cfg else 1), 0
    encode = pipe.encode_prompt

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        result = encode(*args, **kwargs)
        done += 1
        if done == wanted:
            raise _Encoded
        return result

    pipe.encode_prompt = counted
    try:
        with ExitStack() as stack:
            stack.enter_context(clock.stage("text_encode"))
            stack.enter_context(working_area(pipe, width * height))
            stack.enter_context(encoded_once(pipe, memo))
            try:
                pipe(image=pictures if len(pictures) > 1 else pictures[0], prompt=prompt,
                     negative_prompt=negative_prompt if use_cfg else None, true_cfg_scale=true_cfg_scale,
                     height=height, width=width, num_inference_steps=1, output_type="pt")
            except _Encoded:
                pass
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the stage's time is the encoder's, not the next reading's
    finally:
        del pipe.encode_prompt  # back to the class's method
    if done != wanted:
        raise RuntimeError(f"the pipeline encoded {done} prompt(s) before its transformer, not {wanted}")
    return memo
