"""The model as loaded: Lightning LoRA fused for real, the scheduler's sigmas, the attention
backend and the memory savers taking effect as reported (real diffusers, tiny weights)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_job
from qwen_edit_worker.errors import ModelLoadError
from qwen_edit_worker.model import accel, tiny
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights.lightning import fuse_lightning
from qwen_edit_worker.weights.variants import VARIANTS

BLOCK = "transformer_blocks.0.attn.to_q"


def loaded(worker: Worker):  # the LoadedModel behind a worker
    return worker.model.get()[0].model


def decode(out: dict) -> np.ndarray:
    from conftest import decode_output_image

    return decode_output_image(out["images"][0])


def tiny_pipe(variant: str = "edit-2511"):
    import diffusers

    v = VARIANTS[variant]
    return getattr(diffusers, v.pipeline_class)(**tiny.build_components(v, tiny.base_scheduler()))


class TestLightningLora:
    def test_fused_weights_equal_base_plus_lora_delta(self, worker_for: Callable[..., Worker]) -> None:
        base = tiny_pipe().transformer.get_submodule(BLOCK).weight.detach().clone()
        state = tiny.lora_state_dict()
        down, up = state[f"{BLOCK}.lora_down.weight"], state[f"{BLOCK}.lora_up.weight"]
        alpha = state[f"{BLOCK}.alpha"].item()
        model = loaded(worker_for("edit-2511"))
        fused = model.pipe.transformer.get_submodule(BLOCK).weight.detach()
        assert torch.allclose(fused, base + (alpha / down.shape[0]) * up @ down, atol=1e-5)
        assert not torch.allclose(fused, base)

    def test_unloaded_after_fuse(self, worker_for: Callable[..., Worker]) -> None:
        model = loaded(worker_for("edit-2509"))
        assert model.lora_layers == len(tiny.LORA_MODULES) * tiny.NUM_LAYERS
        assert model.pipe.get_list_adapters() == {}
        assert not any(hasattr(m, "lora_A") for m in model.pipe.transformer.modules())

    def test_lora_diffusers_loads_silently_as_nothing_is_a_load_error(self, tmp_path: Path) -> None:
        """diffusers only warns ("No LoRA keys associated ...") and runs the base model at 3 steps."""
        from safetensors.torch import save_file

        renamed = {k.replace("transformer_blocks", "unet.blocks").replace("lora_down", "lora_A")
                   .replace("lora_up", "lora_B"): t for k, t in tiny.lora_state_dict().items() if "alpha" not in k}
        save_file(renamed, str(tmp_path / "other.safetensors"))
        pipe = tiny_pipe()
        with pytest.raises(ModelLoadError) as caught:
            fuse_lightning(pipe, tmp_path / "other.safetensors")
        assert caught.value.subject == "LORA_PATH" and "matched no layer" in str(caught.value)
        assert pipe.get_list_adapters() == {}

    def test_lora_for_other_modules_is_a_load_error(self, tmp_path: Path) -> None:
        bad = tiny.write_lora(tmp_path / "other.safetensors", prefix="single_transformer_blocks")
        with pytest.raises(ModelLoadError) as caught:
            fuse_lightning(tiny_pipe(), bad)
        assert caught.value.subject == "LORA_PATH" and "matched no layer" in str(caught.value)
        assert len(str(caught.value)) < 400

    @pytest.mark.parametrize(("content", "fragment"), [
        (None, "does not exist"), (b"\x00garbage" * 10, "cannot read"), ("no-lora", "holds no LoRA weights"),
    ])
    def test_unusable_files(self, tmp_path: Path, content: object, fragment: str) -> None:
        path = tmp_path / "lora.safetensors"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content == "no-lora":
            from safetensors.torch import save_file

            save_file({"weight": torch.zeros(2)}, str(path))
        with pytest.raises(ModelLoadError, match=fragment):
            fuse_lightning(tiny_pipe(), path)

    def test_bad_lora_reaches_every_job(self, tmp_path: Path) -> None:
        bad = tiny.write_lora(tmp_path / "bad.safetensors", prefix="nothing_here")
        worker = Worker({"TINY_MODEL": "1", "WARMUP": "0", "LORA_PATH": str(bad)})
        for _ in range(2):
            error = worker.handle(small_job())["error"]
            assert error.startswith("LORA_PATH: ") and "bad.safetensors matched no layer" in error


class TestScheduler:
    def test_lightning_sigmas_for_three_steps(self, worker_for: Callable[..., Worker]) -> None:
        worker = worker_for("edit-2511")
        assert "error" not in worker.handle(small_job())
        sigmas = loaded(worker).pipe.scheduler.sigmas.numpy()
        assert np.allclose(sigmas, [1.0, 0.857, 0.6, 0.0], atol=1e-3)

    def test_base_model_keeps_its_own_schedule(self, worker_for: Callable[..., Worker]) -> None:
        worker = worker_for("edit", LIGHTNING="0")
        out = worker.handle(small_job(num_inference_steps=3))
        assert out["model"]["lightning"] is False
        sigmas = loaded(worker).pipe.scheduler.sigmas.numpy()
        assert not np.allclose(sigmas, [1.0, 0.857, 0.6, 0.0], atol=1e-2)
        assert loaded(worker).lora_layers == 0


class TestOffload:
    @pytest.mark.parametrize("mode", ["text_encoder", "model", "group"])
    def test_offload_needs_cuda(self, mode: str) -> None:
        error = Worker({"TINY_MODEL": "1", "WARMUP": "0", "OFFLOAD": mode}).handle(small_job())["error"]
        assert error == f"OFFLOAD: {mode} offload moves weights to a CUDA GPU and there is none; use auto or none"


class TestPrecisionAndCompile:
    def test_fp8_needs_a_float8_gpu(self) -> None:
        from qwen_edit_worker.weights import precision

        error = Worker({"TINY_MODEL": "1", "WARMUP": "0", "PRECISION": "fp8"}).handle(small_job())["error"]
        assert error == "PRECISION: fp8 needs a CUDA GPU with float8 units (Ada or Hopper); use bf16 or int8"
        with pytest.raises(ModelLoadError, match="compute capability 8.9 or newer .* this GPU is 8.0"):
            precision.check("fp8", "PRECISION", True, (8, 0))  # an A100
        precision.check("fp8", "PRECISION", True, (9, 0))  # an H100 passes the check

    def test_regional_compile_is_warmed_at_load_and_matches_eager(self, worker_for: Callable[..., Worker]) -> None:
        from torch._dynamo.utils import counters

        eager = worker_for("edit-2511").handle(small_job(seed=3))
        graphs_before_load = counters["stats"]["unique_graphs"]
        worker = Worker({"TINY_MODEL": "1", "WARMUP": "0", "COMPILE": "regional"})
        worker.model.get()  # loading compiles and warms up at the tiny warm-up size (64x64)
        blocks = loaded(worker).pipe.transformer.transformer_blocks
        assert all(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)
        graphs_after_load = counters["stats"]["unique_graphs"]
        assert graphs_after_load > graphs_before_load
        out = worker.handle(small_job(seed=3))  # 64x64, the warmed size
        assert counters["stats"]["unique_graphs"] == graphs_after_load  # the job compiled nothing
        assert out["model"]["compile"] == "regional"
        diff = np.abs(decode(out).astype(int) - decode(eager).astype(int)).max()
        assert diff <= 2  # same function, compiled


class TestMemorySaving:
    def test_on_applies_vae_slicing_and_tiling(self, worker_for: Callable[..., Worker]) -> None:
        worker = worker_for("edit-2511", MEMORY_SAVING="on")
        out = worker.handle(small_job())
        vae = loaded(worker).pipe.vae
        assert vae.use_slicing and vae.use_tiling
        assert out["model"]["memory_saving"] == ["vae_slicing", "vae_tiling"]

    @pytest.mark.parametrize("mode", ["off", "auto"])  # auto on a CPU: no GPU under 48 GB
    def test_off_and_auto_on_cpu(self, worker_for: Callable[..., Worker], mode: str) -> None:
        worker = worker_for("edit-2511", MEMORY_SAVING=mode)
        out = worker.handle(small_job())
        vae = loaded(worker).pipe.vae
        assert not vae.use_slicing and not vae.use_tiling and out["model"]["memory_saving"] == []

    def test_auto_threshold(self) -> None:
        assert accel.memory_saving_enabled("auto", 24 * 10**9)
        assert not accel.memory_saving_enabled("auto", 80 * 10**9)
        assert not accel.memory_saving_enabled("auto", None)
        assert accel.memory_saving_enabled("on", None) and not accel.memory_saving_enabled("off", 10**9)

    def test_attention_slicing_is_a_no_op_on_qwen(self) -> None:
        """Pins facts.md: no Qwen component can slice attention, so the worker does not claim it."""
        pipe = tiny_pipe()
        assert [n for n, c in pipe.components.items() if hasattr(c, "set_attention_slice")] == []
        before = [type(m.processor) for m in pipe.transformer.modules() if hasattr(m, "processor")]
        pipe.enable_attention_slicing()
        assert before == [type(m.processor) for m in pipe.transformer.modules() if hasattr(m, "processor")]
        assert "attention_slicing" not in " ".join(accel.apply_memory_saving(pipe))
