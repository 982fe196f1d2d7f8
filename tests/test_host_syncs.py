"""No host synchronisation inside the denoising loop, at any precision (weights/int8_mm.py, placement/syncs.py).

The loop is one transformer forward, the CFG arithmetic, the scheduler's step and the worker's step callback.
The forward runs at full size (the real config, 2 blocks: every block makes the same calls) on fake CUDA
(placement/fakecuda.py), where the counter sees each operation that would make the host wait for a GPU.
torchao's own int8 matmul formats its input once per linear layer (846 in the 60-block transformer); with the
worker's matmul installed the count is zero, and the numbers are torchao's.  A real GPU's confirmation is
pending (issue 24): fake CUDA cannot see a wait the driver adds on its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from conftest import decode_output_image, small_job
from qwen_edit_worker.placement import fakecuda, syncs
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights import int8_mm

IMAGE_TOKENS = 2 * 4096  # a 1 MP output (64 x 64 latent patches) and one 1 MP picture
LINEARS_PER_BLOCK, LINEARS_OUTSIDE = 14, 6  # 60 x 14 + 6 = 846


@pytest.fixture
def torchaos_own(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torchao's int8 matmul as it ships, for the length of a test."""
    import importlib

    from torchao.kernel import intmm

    monkeypatch.setattr(importlib.import_module(int8_mm.TARGET), "int_scaled_matmul", intmm.int_scaled_matmul)
    yield


def forward_syncs(precision: str, layers: int = 2) -> syncs.Syncs:
    return syncs.transformer_forward(precision, layers)


class TestCounter:
    def test_counts_every_kind_of_wait_on_cuda_tensors_and_none_on_cpu(self) -> None:
        with fakecuda.fake_cuda():
            x = torch.ones(4, 4)
            with syncs.counting() as seen:
                assert x.sum().item() == 1.0  # a fake tensor has no value: the counter answers 1
                bool(x.any())
                line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
                x.cpu()
                x.nonzero()
                repr(x)
                f"{x}"  # noqa: B018 (formatting is the point)
                torch.ones(3, device="cpu").sum().item()  # a CPU value: no GPU to wait for
        assert dict(seen.counts) == {"read a value (item/tolist/bool/int)": 2, "copy to the host": 1,
                                     "data-dependent size (nonzero)": 1, "format a tensor (repr/str)": 2}
        assert seen.total == 6 and seen.first["copy to the host"].endswith(f"test_host_syncs.py:{line}")


class TestForward:
    def test_torchaos_int8_matmul_formats_its_input_in_every_linear(self, torchaos_own: None) -> None:
        """The bug: one device-to-host formatting per int8 linear layer (34 in 2 blocks; 846 in 60)."""
        seen = forward_syncs("int8")
        assert dict(seen.counts) == {"format a tensor (repr/str)": 2 * LINEARS_PER_BLOCK + LINEARS_OUTSIDE}
        assert seen.first["format a tensor (repr/str)"].endswith("torchao/kernel/intmm.py:51")

    @pytest.mark.parametrize("precision", ["bf16", "int8", "fp8"])
    def test_zero_syncs_a_forward_at_each_precision(self, precision: str) -> None:
        assert int8_mm.install()
        seen = forward_syncs(precision)
        assert seen.total == 0, (dict(seen.counts), seen.first)


class TestInt8Numbers:
    @pytest.mark.parametrize(("rows", "inner", "columns"), [(1, 64, 48), (37, 3072, 128), (17, 24, 8), (5, 7, 3)])
    def test_the_same_numbers_as_torchaos_matmul_on_the_cpu(self, rows: int, inner: int, columns: int) -> None:
        from torchao.kernel import intmm

        generator = torch.Generator().manual_seed(rows)
        a = torch.randint(-128, 128, (rows, inner), dtype=torch.int8, generator=generator)
        b = torch.randint(-128, 128, (columns, inner), dtype=torch.int8, generator=generator).t()  # as a weight
        scales = torch.rand(rows, 1, generator=generator)
        ours, theirs = int8_mm.int_scaled_matmul(a, b, scales), intmm.int_scaled_matmul(a, b, scales)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)

    def test_the_loader_installs_it_and_an_int8_edit_has_torchaos_pixels(self, torchaos_own: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """The tiny model at PRECISION=int8 on the CPU: the worker's matmul is in place after loading, every
        linear goes through it, and the picture equals the one torchao's own matmul gives."""
        import importlib

        from torchao.kernel import intmm

        assert not int8_mm.installed()
        worker = Worker({"TINY_MODEL": "1", "WARMUP": "0", "PRECISION": "int8", "MODEL_VARIANT": "edit-2511"})
        calls = [0]
        ours = int8_mm.int_scaled_matmul

        def counted(*args: Any) -> Any:
            calls[0] += 1
            return ours(*args)

        out = worker.handle(small_job(seed=5))
        assert "error" not in out, out
        assert int8_mm.installed()
        target = importlib.import_module(int8_mm.TARGET)
        monkeypatch.setattr(target, "int_scaled_matmul", counted)
        again = worker.handle(small_job(seed=5))
        assert calls[0] > 0
        monkeypatch.setattr(target, "int_scaled_matmul", intmm.int_scaled_matmul)
        reference = worker.handle(small_job(seed=5))
        pictures = [decode_output_image(o["images"][0]) for o in (out, again, reference)]
        assert np.array_equal(pictures[0], pictures[2]) and np.array_equal(pictures[1], pictures[2])


class TestLoop:
    def test_the_lightning_schedulers_steps_read_nothing_back(self) -> None:
        """diffusers' FlowMatchEuler step as the pipeline drives it (set_begin_index(0), timesteps on the GPU,
        sigmas kept on the CPU by the scheduler itself): three steps, no wait."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from qwen_edit_worker.weights import lightning

        scheduler = lightning.lightning_scheduler(FlowMatchEulerDiscreteScheduler())
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3).tolist(), mu=1.0)  # as the pipeline sets them
        scheduler.set_begin_index(0)
        with fakecuda.fake_cuda():
            scheduler.timesteps = scheduler.timesteps.to("cuda")  # the pipeline's device
            latents = torch.randn(1, IMAGE_TOKENS // 2, 64, dtype=torch.bfloat16)
            with syncs.counting() as seen:
                for t in scheduler.timesteps:
                    noise = torch.randn_like(latents)
                    latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        assert scheduler.timesteps.device.type == "cuda" and scheduler.step_index == 3
        assert seen.total == 0, (dict(seen.counts), seen.first)

    def test_the_workers_step_callback_reads_the_clock_once_per_call_not_per_step(
            self, worker_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a GPU each clock reading synchronises (accounting/timing.py): the callback reads it at the last
        step only, so a 4-step job waits for the GPU as often as a 1-step one."""
        from qwen_edit_worker.serving.engine import Editor

        worker = worker_for("edit-2511")
        readings = [0]
        monkeypatch.setattr(Editor, "sync", lambda self: readings.__setitem__(0, readings[0] + 1))
        counts = {}
        for steps in (1, 4):
            readings[0] = 0
            out = worker.handle(small_job(num_inference_steps=steps))
            assert "error" not in out and out["timing"]["denoise_ms"] > 0, out
            counts[steps] = readings[0]
        assert counts[1] == counts[4] > 0
