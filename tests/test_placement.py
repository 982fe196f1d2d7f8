"""OFFLOAD=auto: the placement plan for each GPU class and precision, and the sizes it is fed.

The plan is a pure function, so every RunPod class is checked here without its GPU, on the real
model's component sizes (placement.REFERENCE_BYTES, from its configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwen_edit_worker import placement
from qwen_edit_worker.placement import GB, reference_sizes

BF16 = reference_sizes("bf16", "bf16")
INT8_T = reference_sizes("int8", "bf16")
INT8_BOTH = reference_sizes("int8", "int8")
SIZES = {"bf16": BF16, "int8 transformer": INT8_T, "int8 both": INT8_BOTH}

EXPECTED = {  # GPU GB -> placement, per precision (fastest that fits with room for 2 MP x 4)
    "bf16": {16: "group", 24: "group", 32: "group", 40: "group", 48: "group", 80: "none", 141: "none"},
    "int8 transformer": {16: "group", 24: "group", 32: "model", 40: "text_encoder", 48: "none", 80: "none",
                         141: "none"},
    "int8 both": {16: "group", 24: "group", 32: "model", 40: "none", 48: "none", 80: "none", 141: "none"},
}


class TestPlan:
    @pytest.mark.parametrize("precision", list(EXPECTED))
    @pytest.mark.parametrize("gpu_gb", [16, 24, 32, 40, 48, 80, 141])
    def test_each_class_gets_the_fastest_placement_that_fits(self, precision: str, gpu_gb: int) -> None:
        sizes = SIZES[precision]
        plan = placement.plan(sizes, gpu_gb * GB)
        assert plan.fits and plan.offload == EXPECTED[precision][gpu_gb]
        assert plan.need_bytes <= gpu_gb * GB
        for faster in placement.MODES[:placement.MODES.index(plan.offload)]:  # and nothing faster fits
            assert placement.need(faster, sizes)[0] > gpu_gb * GB
        assert plan.reason.startswith("fastest that fits")

    def test_what_crosses_pcie_per_job(self) -> None:
        assert placement.plan(BF16, 80 * GB).moved_per_job_bytes == 0
        assert placement.plan(INT8_T, 40 * GB).moved_per_job_bytes == INT8_T["text_encoder"]
        assert placement.plan(INT8_T, 32 * GB).moved_per_job_bytes == sum(INT8_T.values())

    def test_nothing_fits_is_said_plainly(self) -> None:
        plan = placement.plan(BF16, 12 * GB)
        assert not plan.fits
        assert plan.reason.startswith("nothing fits: even group offload needs 14.8 GB") and "12.0 GB" in plan.reason

    def test_a_larger_job_needs_more_room(self) -> None:
        assert placement.plan(INT8_BOTH, 40 * GB).offload == "none"
        assert placement.plan(INT8_BOTH, 40 * GB, headroom=12 * GB).offload == "text_encoder"

    def test_explicit_mode_is_kept_and_a_misfit_is_flagged(self) -> None:
        plan = placement.plan(BF16, 48 * GB, mode="none")
        assert plan.offload == "none" and not plan.fits and "does NOT fit" in plan.reason
        assert placement.plan(BF16, 80 * GB, mode="model").offload == "model"

    def test_without_a_gpu_everything_stays_on_the_cpu(self) -> None:
        plan = placement.plan(BF16, None)
        assert (plan.offload, plan.fits, plan.gpu_bytes) == ("none", True, None)
        assert plan.info()["gpu_gb"] is None and plan.info()["offload"] == "none"


class TestSizes:
    def test_sizes_from_headers_at_each_precision(self, tmp_path: Path) -> None:
        """bf16 counts 2 bytes an element whatever the file stores; int8/fp8 count linear weights as torchao stores
        them (1 byte an element; per row a float32 scale, and for int8 an int8 zero point too); embeddings, biases
        and tensors already stored as int8 are not shrunk again."""
        tensors = {
            "blocks.0.to_q.weight": torch.zeros(64, 32),  # float32 on disk: a linear weight
            "blocks.0.to_q.bias": torch.zeros(64),
            "embed_tokens.weight": torch.zeros(100, 32),  # 2-D but an embedding
            "blocks.1.to_k.weight": torch.zeros(16, 32, dtype=torch.int8),  # stored already quantised
            "blocks.1.to_k.scale": torch.zeros(16, dtype=torch.float32),
        }
        save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
        floats = 64 * 32 + 64 + 100 * 32 + 16
        assert placement.folder_bytes(tmp_path, "bf16") == floats * 2 + 16 * 32
        rest = (64 + 100 * 32 + 16) * 2 + 16 * 32
        assert placement.folder_bytes(tmp_path, "int8") == 64 * 32 + 64 * 5 + rest
        assert placement.folder_bytes(tmp_path, "fp8") == 64 * 32 + 64 * 4 + rest

    def test_model_bytes_reads_each_component(self, tmp_path: Path) -> None:
        for name, rows in (("transformer", 8), ("text_encoder", 4), ("vae", 2)):
            (tmp_path / name).mkdir()
            weights = {"layer.weight": torch.zeros(rows, 10, dtype=torch.bfloat16)}
            save_file(weights, str(tmp_path / name / "m.safetensors"))
        sizes = placement.model_bytes(tmp_path, "int8", "bf16")
        assert sizes == {"transformer": 8 * 10 + 8 * 5, "text_encoder": 4 * 10 * 2, "vae": 2 * 10 * 2}


class TestStreamedTextEncoder:
    def test_text_encoder_under_group_offload_hooks_gives_the_same_edit(self) -> None:
        """OFFLOAD=text_encoder streams the Qwen2.5-VL encoder's layers through diffusers' group-offload
        hooks.  Here the hooks run for real with the CPU as the "GPU" (no CUDA stream): the pipeline still
        finds its execution device and the picture is identical, so the hooks do not change the encoding."""
        import numpy as np

        from conftest import decode_output_image, small_job
        from qwen_edit_worker.model import accel
        from qwen_edit_worker.serving.worker import Worker

        worker = Worker({"TINY_MODEL": "1", "WARMUP": "0"})
        before = decode_output_image(worker.handle(small_job(seed=5))["images"][0])
        pipe = worker.model.get()[0].model.pipe
        accel.stream_text_encoder(pipe, torch.device("cpu"), use_stream=False)
        assert any(hasattr(m, "_diffusers_hook") for m in pipe.text_encoder.modules())  # the hooks are in place
        after = decode_output_image(worker.handle(small_job(seed=5))["images"][0])
        assert np.array_equal(before, after)
