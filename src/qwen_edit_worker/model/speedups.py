"""Compilation: the setting that takes Python and kernel-launch overhead out of each step on a GPU.

Why this exists: a 3-step edit on an H100 is dominated by three transformer passes (~167 TFLOP
each at 1 MP), so the transformer's arithmetic is where cost goes (weights/precision.py makes each
operation cheaper; this module makes the block run as compiled kernels).
- COMPILE=regional compiles the transformer's repeated block once (diffusers'
  `compile_repeated_blocks`) and warms it up during loading, so no job pays for compilation.
  A job at a new size recompiles once (seconds on a GPU), so it suits endpoints with few sizes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def compile_regional(transformer: Any) -> None:
    """Compile the repeated transformer block (the first call afterwards compiles for real)."""
    transformer.compile_repeated_blocks(fullgraph=True)


def warm_up(run_edit: Any, size: tuple[int, int]) -> float:
    """Run one throw-away edit at `size` so compilation happens now, not in a job; return seconds."""
    started = time.perf_counter()
    run_edit(size)
    seconds = time.perf_counter() - started
    log.info("compile: warmed up at %dx%d in %.1f s", size[0], size[1], seconds)
    return seconds
