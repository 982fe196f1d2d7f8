"""Jobs end to end through the Worker on the real pipelines with tiny weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import VARIANTS, b64_picture, decode_output_image, small_job, tiny_env
from qwen_edit_worker.accounting.timing import STAGES
from qwen_edit_worker.serving.worker import Worker

WorkerFor = Callable[..., Worker]


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result.get("error")
    return result


class TestEdits:
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_each_variant_end_to_end(self, worker_for: WorkerFor, variant: str) -> None:
        out = ok(worker_for(variant).handle(small_job(seed=11)))
        assert set(out) == {"images", "image_url", "seed", "timing", "cost", "model", "warnings", "has_nsfw_concepts"}
        assert out["has_nsfw_concepts"] == [False]
        [item] = out["images"]
        assert {k: item[k] for k in ("type", "format", "width", "height", "seed", "nsfw")} == {
            "type": "base64", "format": "png", "width": 64, "height": 64, "seed": 11, "nsfw": False}
        assert decode_output_image(item).shape == (64, 64, 3)
        assert out["seed"] == 11 and out["warnings"] == []
        assert out["model"] == {"variant": variant, "lightning": True, "steps": 3, "attention_backend": "native",
                                "attention_choice": "auto: no CUDA device", "attention_ms": {},
                                "memory_saving": [], "offload": "none", "precision": "bf16", "compile": "off",
                                "text_encoder_precision": "bf16", "lightning_fused": "load",
                                "quantised_at_load": {},
                                "placement": {"offload": "none", "fits": True, "need_gb": 0.0, "gpu_gb": None,
                                              "resident_gb": 0.0, "moved_per_job_gb": 0.0, "transfer_s_per_job": 0.0,
                                              "max_megapixels": None, "batched_images": None,
                                              "reason": "no GPU: every component runs on the CPU"},
                                "dtype": "float32", "device": "cpu",
                                "source": "tiny", "manifest": None, "loras": [],
                                "safety_checker": {"model": "tiny", "device": "cpu", "input": [224, 224],
                                                   "threshold": 0.5}}

    @pytest.mark.parametrize("variant", ["edit-2509", "edit-2511"])
    def test_multi_image_on_edit_plus(self, worker_for: WorkerFor, variant: str) -> None:
        images = [b64_picture(96, 64, seed=1), b64_picture(64, 64, seed=2), b64_picture(64, 128, seed=3)]
        out = ok(worker_for(variant).handle(small_job(image=None, images=images, width=None, height=None,
                                                      megapixels=0.0625)))
        item = out["images"][0]
        assert (item["width"], item["height"]) == (176, 368)  # the last picture's 1:2 aspect at 0.0625 MP
        other = ok(worker_for(variant).handle(small_job(image=None, images=images[:1] + images[2:])))
        assert not np.array_equal(decode_output_image(other["images"][0]), decode_output_image(
            ok(worker_for(variant).handle(small_job(image=None, images=images)))["images"][0]))

    def test_multi_image_refused_on_edit(self, worker_for: WorkerFor) -> None:
        error = worker_for("edit").handle(small_job(image=None, images=[b64_picture()]))["error"]
        assert error.startswith("input.images: multi-image input needs MODEL_VARIANT edit-2509 or edit-2511")

    def test_output_formats(self, worker_for: WorkerFor) -> None:
        for fmt in ("jpeg", "webp"):
            item = ok(worker_for().handle(small_job(output_format=fmt, output_quality=80)))["images"][0]
            assert item["format"] == fmt and decode_output_image(item).shape == (64, 64, 3)


class TestSeeds:
    def test_same_seed_same_pixels_different_seed_different(self, worker_for: WorkerFor) -> None:
        worker = worker_for()
        first, again, other = (decode_output_image(ok(worker.handle(small_job(seed=s)))["images"][0])
                               for s in (5, 5, 6))
        assert np.array_equal(first, again)
        assert not np.array_equal(first, other)

    def test_random_seed_is_returned_and_reproduces(self, worker_for: WorkerFor) -> None:
        worker = worker_for()
        out = ok(worker.handle(small_job(seed=-1)))
        assert 0 <= out["seed"] < 2**32 and out["images"][0]["seed"] == out["seed"]
        replay = ok(worker.handle(small_job(seed=out["seed"])))
        assert np.array_equal(decode_output_image(out["images"][0]), decode_output_image(replay["images"][0]))

    @pytest.mark.parametrize(("seed", "seeds"), [(2**32 - 1, [2**32 - 1, 2**32, 2**32 + 1]),
                                                 (2**64 - 1, [2**64 - 1, 0, 1])])
    def test_num_images_get_consecutive_seeds(self, worker_for: WorkerFor, seed: int, seeds: list[int]) -> None:
        """Across 2**32 the seeds go on (they wrapped to 0 before); only past 2**64-1 do they wrap."""
        out = ok(worker_for().handle(small_job(seed=seed, num_images=3)))
        assert out["seed"] == seed and [i["seed"] for i in out["images"]] == seeds
        pixels = [decode_output_image(i) for i in out["images"]]
        assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])


class TestTimingAndCost:
    def test_timing_fields_consistent(self, worker_for: WorkerFor) -> None:
        worker = worker_for()
        timing = ok(worker.handle(small_job(num_inference_steps=4)))["timing"]
        stage_ms = [timing[f"{stage}_ms"] for stage in STAGES]
        assert all(timing[f"{stage}_ms"] > 0 for stage in STAGES if stage not in ("queue", "lora")), timing
        assert timing["lora_ms"] == 0  # no request LoRAs
        assert sum(stage_ms) + timing["load_ms"] <= timing["total_ms"]
        model_ms = sum(timing[f"{stage}_ms"] for stage in ("text_encode", "vae_encode", "denoise", "decode"))
        assert model_ms <= timing["gpu_ms"] <= timing["total_ms"] - timing["inputs_ms"]
        assert timing["steps"] == 4
        assert timing["ms_per_step"] == pytest.approx(timing["denoise_ms"] / 4, abs=0.02)

    def test_cost_from_env_price(self, worker_for: WorkerFor) -> None:
        out = ok(worker_for(GPU_PRICE_PER_SECOND="0.002").handle(small_job(num_images=2)))
        cost = out["cost"]
        assert cost["price_source"] == "env" and cost["usd_per_second"] == 0.002 and cost["gpu"] is None
        timing = out["timing"]
        assert cost["seconds"] == pytest.approx((timing["total_ms"] - timing["queue_ms"]) / 1000, abs=0.01)
        assert cost["usd"] == pytest.approx(cost["seconds"] * 0.002, rel=1e-3)
        assert cost["usd_per_image"] == pytest.approx(cost["usd"] / 2, rel=1e-3)

    def test_cost_unknown_on_cpu(self, worker_for: WorkerFor) -> None:
        cost = ok(worker_for().handle(small_job()))["cost"]
        assert cost["price_source"] == "unknown" and cost["usd"] is None

    def test_progress_after_each_step(self) -> None:
        calls: list[tuple[str, Any]] = []
        worker = Worker(tiny_env(), progress=lambda job, p: calls.append((job["id"], p)))
        ok(worker.handle(small_job(num_inference_steps=3)))
        assert calls == [("test-job", {"step": n, "steps": 3}) for n in (1, 2, 3)]


class TestWorkingSize:
    def test_vae_works_at_the_requested_area(self, worker_for: WorkerFor) -> None:
        """Pins the working-area control against the installed diffusers (see engine.working_area)."""
        seen: list[tuple[int, ...]] = []
        for variant in ("edit", "edit-2511"):
            worker = worker_for(variant)
            encoder = worker.model.get()[0].model.pipe.vae.encoder
            hook = encoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
            try:
                item = ok(worker.handle(small_job(image=b64_picture(120, 90), width=None, height=None,
                                                  megapixels=0.0625)))["images"][0]
            finally:
                hook.remove()
            assert (item["width"], item["height"]) == (288, 224)
            height, width = seen[-1]
            assert abs(width * height - 256 * 256) < 0.1 * 256 * 256  # not the pipelines' 1024*1024
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

        assert plus.calculate_dimensions(1024 * 1024, 1.0) == (1024, 1024)  # restored after the job


class TestLoading:
    def test_warmup_loads_before_the_first_job(self) -> None:
        worker = Worker(tiny_env(WARMUP="1", MODEL_VARIANT="edit-2509"))
        worker.start()
        deadline = time.monotonic() + 120
        while not worker.model.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        timing = ok(worker.handle(small_job()))["timing"]
        assert timing["cold_start"] is False and timing["load_ms"] == 0

    def test_without_warmup_the_first_job_loads(self) -> None:
        worker = Worker(tiny_env(MODEL_VARIANT="edit-2509"))
        worker.start()
        assert not worker.model.ready
        first, second = (ok(worker.handle(small_job()))["timing"] for _ in range(2))
        assert first["cold_start"] is True and first["load_ms"] > 0
        assert first["total_ms"] >= first["load_ms"]
        assert second["cold_start"] is False and second["load_ms"] == 0

    def test_load_failure_reaches_every_job_and_is_logged_once(self, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
        worker = Worker({"MODEL_PATH": str(tmp_path / "missing"), "WARMUP": "0"})
        with caplog.at_level(logging.ERROR):
            errors = [worker.handle(small_job())["error"] for _ in range(3)]
        assert errors == [f"MODEL_PATH: {tmp_path / 'missing'} does not exist; bake the model into the image "
                          "or point MODEL_PATH at it"] * 3
        assert sum("model load failed" in r.message for r in caplog.records) == 1

    def test_bad_setting_reaches_every_job(self) -> None:
        worker = Worker({"MODEL_VARIANT": "edit-9999"})
        assert worker.handle(small_job())["error"].startswith("MODEL_VARIANT: must be one of edit, edit-2509")

    def test_bad_gpu_prices_reach_every_job(self) -> None:
        """GPU_PRICES is machine-written (`qwen-edit deploy`); a hand-edited one that is not JSON is answered like
        any bad setting, naming it, instead of stopping the worker."""
        worker = Worker({"GPU_PRICES": "NVIDIA L4=0.00019"})
        errors = [worker.handle(small_job())["error"] for _ in range(2)]
        assert errors[0] == errors[1] and errors[0].startswith("GPU_PRICES: must be a JSON object")

    def test_request_errors_come_before_loading(self, tmp_path: Path) -> None:
        worker = Worker({"MODEL_PATH": str(tmp_path), "WARMUP": "0"})
        assert worker.handle(small_job(seed="x"))["error"].startswith("input.seed: ")
        assert not worker.model.ready

    def test_loads_a_saved_pipeline_folder_offline(self, tmp_path: Path) -> None:
        """The real loading path (from_pretrained on a folder, LoRA at the baked layout), tiny weights."""
        import diffusers

        from qwen_edit_worker.model import tiny
        from qwen_edit_worker.safety import tiny as safety_tiny
        from qwen_edit_worker.weights.variants import VARIANTS as TABLE

        variant = TABLE["edit-2509"]
        pipe = getattr(diffusers, variant.pipeline_class)(**tiny.build_components(variant, tiny.base_scheduler()))
        pipe.save_pretrained(tmp_path / "model")
        tiny.write_lora(tmp_path / "model" / "lightning" / variant.lora_basename)
        safety_tiny.save(tmp_path / "model" / "safety_checker")  # where the bake puts the checker
        worker = Worker({"MODEL_PATH": str(tmp_path / "model"), "MODEL_VARIANT": "edit-2509", "WARMUP": "0"})
        out = ok(worker.handle(small_job()))
        assert out["model"]["source"] == str(tmp_path / "model") and out["images"][0]["width"] == 64
        assert out["model"]["safety_checker"]["model"] == str(tmp_path / "model" / "safety_checker")
        assert out["has_nsfw_concepts"] == [False]  # loaded from the folder, biased to flag nothing
        assert worker.model.get()[0].model.lora_layers == len(tiny.LORA_MODULES) * tiny.NUM_LAYERS


def test_damaged_weights_name_the_folder(tmp_path: Path) -> None:
    import diffusers

    from qwen_edit_worker.model import tiny
    from qwen_edit_worker.weights.variants import VARIANTS as TABLE

    variant = TABLE["edit"]
    pipe = getattr(diffusers, variant.pipeline_class)(**tiny.build_components(variant, tiny.base_scheduler()))
    pipe.save_pretrained(tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    worker = Worker({"MODEL_PATH": str(tmp_path), "MODEL_VARIANT": "edit", "WARMUP": "0", "SAFETY_CHECKER": "off"})
    for _ in range(2):
        error = worker.handle(small_job())["error"]
        assert error.startswith(f"MODEL_PATH: cannot load the transformer from {tmp_path}: ")  # the part read alone


class TestFailures:
    def _inject(self, worker: Worker, error: BaseException) -> Any:
        transformer = worker.model.get()[0].model.pipe.transformer

        def fail(module: Any, args: Any) -> None:
            raise error

        return transformer.register_forward_pre_hook(fail)

    def test_out_of_memory_asks_for_a_fresh_worker(self, worker_for: WorkerFor) -> None:
        worker = worker_for()
        hook = self._inject(worker, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"))
        try:
            result = worker.handle(small_job())
        finally:
            hook.remove()
        assert result["refresh_worker"] is True
        assert result["error"].startswith("out of GPU memory: try a smaller input.megapixels")
        ok(worker.handle(small_job()))

    def test_internal_error_is_short_logged_and_survivable(self, worker_for: WorkerFor,
                                                           caplog: pytest.LogCaptureFixture) -> None:
        worker = worker_for()
        hook = self._inject(worker, RuntimeError("kernel exploded"))
        try:
            with caplog.at_level(logging.ERROR):
                result = worker.handle(small_job())
        finally:
            hook.remove()
        assert result == {"error": "internal error (RuntimeError); details are in the worker log"}
        assert any(r.exc_info and "kernel exploded" in str(r.exc_info[1]) for r in caplog.records)
        ok(worker.handle(small_job()))


class TestLogs:
    def test_one_line_per_job_and_no_image_data(self, worker_for: WorkerFor, caplog: pytest.LogCaptureFixture) -> None:
        job = small_job(image=b64_picture(80, 80, seed=9))
        with caplog.at_level(logging.DEBUG):
            out = ok(worker_for().handle(job))
        done = [r.getMessage() for r in caplog.records if "done:" in r.getMessage()]
        assert len(done) == 1 and "test-job" in done[0] and "64x64" in done[0] and "3 steps" in done[0]
        text = caplog.text
        assert job["input"]["image"][:40] not in text and out["images"][0]["image"][:40] not in text
        assert job["input"]["prompt"] not in text
