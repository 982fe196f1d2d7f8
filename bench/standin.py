"""A bench aid: the worker with a stand-in model that holds the GPU section for a fixed time.

Why this exists: on this CPU-only machine the tiny model's "GPU" work runs on the same two cores
as everything else, so it cannot show whether the worker keeps a real GPU busy.  The stand-in
sleeps inside the worker's real GPU section (qwen_edit_worker.serving.gpu_section) for BENCH_MODEL_MS
milliseconds, as a GPU leaves the CPU free, posts a progress update per step, and returns a
fixed photo-like picture of the requested size.  Everything else is the real worker and the real
RunPod SDK.  It is injected in-process by this launcher; the worker itself has no such setting.

    BENCH_MODEL_MS=1000 python bench/standin.py [handler.py's arguments]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from qwen_edit_worker.accounting.timing import StageClock  # noqa: E402
from qwen_edit_worker.placement import plan as placement_plan  # noqa: E402
from qwen_edit_worker.serving.gpu_section import GpuSection  # noqa: E402


def photo(width: int = 1024, height: int = 1024) -> Image.Image:
    """A photo-like test picture: smooth gradients with fine noise (compresses like a photo)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    base = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60], axis=-1)
    noisy = base + rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


class StandInModel:
    """What the worker reads from a loaded model (the job's `model` block, the GPU's name, the safety checker:
    the real tiny one on the CPU, flagging nothing, so a job pays for the check as with a model)."""

    gpu_name = None
    load_seconds = 0.0
    placement = placement_plan({}, None)  # no GPU: no per-job limit, one batch

    def __init__(self) -> None:
        import torch

        from qwen_edit_worker.safety import tiny

        self.safety = tiny.build("cpu", torch.float32)

    def info(self, steps: int) -> dict[str, Any]:
        return {"variant": "stand-in", "steps": steps, "device": "none", "source": "bench/standin.py"}


class StandInEditor:
    """Holds the GPU section for `model_ms` (sleeping: the CPU stays free) and returns a fixed picture."""

    def __init__(self, model_ms: float) -> None:
        self.model_ms = model_ms
        self.model = StandInModel()
        self.section = GpuSection()
        self._pictures: dict[tuple[int, int], np.ndarray] = {}

    def sync(self) -> None:
        pass

    def edit(self, pictures: list[Image.Image], *, steps: int, size: tuple[int, int], seeds: list[int],
             clock: StageClock, on_step: Callable[[int, int], None] | None = None, **_: object) -> np.ndarray:
        if size not in self._pictures:
            self._pictures[size] = np.asarray(photo(*size))
        def model() -> None:
            for step in range(steps):
                time.sleep(self.model_ms / 1000 / steps)
                if on_step is not None:
                    on_step(step + 1, steps)

        self.section.run(clock, model)
        return np.broadcast_to(self._pictures[size], (len(seeds), *self._pictures[size].shape))


def install(model_ms: float) -> None:
    """Make every Worker of this process load the stand-in instead of the model."""
    from qwen_edit_worker.serving import worker

    worker.Worker._load = lambda self: StandInEditor(model_ms)  # type: ignore[method-assign]


if __name__ == "__main__":
    install(float(os.environ.get("BENCH_MODEL_MS", "0")))
    import handler

    sys.exit(handler.main(sys.argv[1:]))
