"""A job sized against the plan, through the handler: refused before the GPU, or split into batches with the
same pictures; and quantisation at load, block by block, giving the same pixels as the whole-model path.

The plans are injected into real tiny-model workers (the real model's sizes on a pretended GPU), so the
answers are the ones a 24 GB worker would give, with the real pipelines underneath."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import decode_output_image, encode_picture, small_job, tiny_env
from qwen_edit_worker import placement
from qwen_edit_worker.errors import RequestError
from qwen_edit_worker.placement import GB, JobShape, reference_sizes
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights import precision

MP = 1024 * 1024


def editor_of(worker: Worker) -> Any:
    return worker.model.get()[0]


@contextmanager
def counting(module: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of `module` while the block runs."""
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def injected(worker: Worker, plan: placement.Plan) -> Iterator[None]:
    model = editor_of(worker).model
    before, model.placement = model.placement, plan
    try:
        yield
    finally:
        model.placement = before


def plan_batching(job: JobShape, batch: int) -> placement.Plan:
    """A plan on the real int8 sizes whose GPU is just large enough for `batch` images of `job` at once."""
    sizes = reference_sizes("int8", "int8")
    def at(megabytes: int) -> placement.Plan:  # OFFLOAD=model: the transformer alone beside the job's activations
        return placement.plan(sizes, megabytes * 10**6, "model", precision="fp8")

    sizes_that_fit = [mb for mb in range(22_000, 22_500) if at(mb).batch_for(job) == batch]
    assert sizes_that_fit, "no GPU size gives that batch"
    return at(sizes_that_fit[len(sizes_that_fit) // 2])  # the middle: the worker's working sizes differ by a few px


class TestRefusedBeforeTheGpu:
    def test_a_job_over_the_limit_is_refused_naming_megapixels_and_nothing_runs(self, worker_for: Any) -> None:
        worker = worker_for("edit-2511")
        worker.handle(small_job())  # loaded
        plan = placement.plan(reference_sizes("int8", "int8"), 24_564 * 2**20, precision="int8",
                                text_encoder_precision="int8")  # the total a 24 GB RTX 3090/4090 reports
        pipe = editor_of(worker).model.pipe
        big = base64.b64encode(encode_picture(Image.new("RGB", (2048, 2048), (40, 90, 160)))).decode()
        with injected(worker, plan), counting(pipe.transformer) as steps, counting(pipe.text_encoder) as prompts:
            out = worker.handle(small_job(image=big, width=2048, height=2048))
        largest = plan.max_megapixels(1)
        assert largest is not None and 2.0 <= largest < 4.0
        error = out.get("error", "")
        assert error.startswith("input.megapixels: a 4.00 MP output from 1 picture(s) needs ~"), out.keys()
        assert f"(offload=text_encoder); the largest this worker can do with 1 picture(s) is {largest:.2f} MP" in error
        assert (steps[0], prompts[0]) == (0, 0)  # refused before the text encoder or the transformer ran
        assert "refresh_worker" not in out

    def test_request_lora_bytes_come_off_the_room_first(self) -> None:
        job = JobShape(MP, (MP,), num_images=4)
        # the total a 24 GB RTX 3090/4090 reports; 2 images a batch at 1 MP
        plan = placement.plan(reference_sizes("int8", "int8"), 24_564 * 2**20, precision="int8",
                              text_encoder_precision="int8")
        assert placement.fit_job(plan, job).batch == 2
        transformer_bytes = placement.activations.transformer_bytes
        per_image = transformer_bytes(job, 2, "int8") - transformer_bytes(job, 1, "int8")
        spare = min(plan.rooms.text - placement.activations.text_bytes(job, "int8"),
                    plan.rooms.denoise - transformer_bytes(job, 1, "int8"))
        assert spare > 0
        takes_second = plan.rooms.denoise - transformer_bytes(job, 2, "int8") + 1
        assert 0 < takes_second < per_image
        assert placement.fit_job(plan, job, adapter_bytes=takes_second).batch == 1  # a small LoRA takes the 2nd image
        with pytest.raises(RequestError, match=rf"^input.loras: the request LoRAs .* take ~{spare * 1.2 / GB:.2f} GB "
                                               rf"of GPU memory, and beside the weights and this job's activations "
                                               rf"there is ~{spare / GB:.2f} GB"):
            placement.fit_job(plan, job, adapter_bytes=int(spare * 1.2))
        on_48 = placement.plan(reference_sizes("int8", "int8"), 48 * GB, precision="fp8")
        # room enough for 0.8 GB of adapters: nothing changes (1 GB, beside the safety checker's 0.17 GB, takes one)
        with_adapters = placement.fit_job(on_48, job, adapter_bytes=int(0.8 * GB))
        assert placement.fit_job(on_48, job).batch == with_adapters.batch == 4

    def test_the_same_job_runs_within_the_limit(self, worker_for: Any) -> None:
        worker = worker_for("edit-2511")
        plan = placement.plan(reference_sizes("int8", "int8"), 24 * GB, precision="fp8")
        with injected(worker, plan):
            out = worker.handle(small_job(width=64, height=64))
        assert "error" not in out and out["model"]["placement"] == plan.info()


class TestBatches:
    @pytest.mark.parametrize("variant", ["edit", "edit-2511"])
    def test_four_images_one_at_a_time_equal_four_at_once(self, worker_for: Any, variant: str) -> None:
        worker = worker_for(variant)
        together = worker.handle(small_job(num_images=4, seed=3))
        assert "error" not in together, together
        tiny_job = placement.job_shape((64, 64), [(64, 64)], small_job()["input"]["prompt"], 4, variant != "edit")
        plan = plan_batching(tiny_job, 1)
        pipe = editor_of(worker).model.pipe
        with injected(worker, plan), counting(pipe.transformer) as passes, counting(pipe.text_encoder) as prompts:
            apart = worker.handle(small_job(num_images=4, seed=3))
        assert "error" not in apart, apart
        assert (passes[0], prompts[0]) == (4 * 3, 1)  # four batches of three steps; the prompt encoded once
        assert [i["seed"] for i in apart["images"]] == [i["seed"] for i in together["images"]] == [3, 4, 5, 6]
        for one, other in zip(apart["images"], together["images"], strict=True):
            a, b = decode_output_image(one).astype(int), decode_output_image(other).astype(int)
            assert np.abs(a - b).max() <= 1  # float tolerance, seen through 8-bit pixels
        first = [decode_output_image(i) for i in apart["images"]]
        assert not np.array_equal(first[0], first[1])  # each image its own seed, not one picture copied

    def test_two_batches_of_two_and_the_steps_reported(self, worker_for: Any) -> None:
        worker = worker_for("edit-2509")
        tiny_job = placement.job_shape((64, 64), [(64, 64)], small_job()["input"]["prompt"], 3, True)
        plan = plan_batching(tiny_job, 2)
        pipe = editor_of(worker).model.pipe
        with injected(worker, plan), counting(pipe.transformer) as passes:
            out = worker.handle(small_job(num_images=3, seed=1))
        assert "error" not in out and len(out["images"]) == 3 and passes[0] == 2 * 3


class TestQuantisedByBlock:
    def test_int8_block_by_block_at_load_gives_the_pixels_of_the_whole_model_path(self) -> None:
        by_block = Worker(tiny_env(PRECISION="int8", TEXT_ENCODER_PRECISION="int8"))
        out = by_block.handle(small_job(seed=9))
        assert "error" not in out, out
        record = out["model"]["quantised_at_load"]
        assert record["transformer"]["where"] == "cpu, block by block"
        blocks = len(editor_of(by_block).model.pipe.transformer.transformer_blocks)
        assert record["transformer"]["blocks"] > blocks  # every block, plus the linears outside them
        assert record["text_encoder"]["where"] == "cpu, block by block"

        whole = Worker(tiny_env())
        whole.handle(small_job(seed=9))
        pipe = editor_of(whole).model.pipe
        precision.quantise_transformer(pipe.transformer, "int8")
        precision.quantise_text_encoder(pipe.text_encoder, "int8")
        reference = whole.handle(small_job(seed=9))
        by_block_pipe = editor_of(by_block).model.pipe
        assert precision.quantised_linears(by_block_pipe.transformer) == precision.quantised_linears(pipe.transformer)
        assert precision.quantised_linears(by_block_pipe.text_encoder) == precision.quantised_linears(pipe.text_encoder)
        assert np.array_equal(decode_output_image(out["images"][0]), decode_output_image(reference["images"][0]))

    def test_the_vision_tower_stays_bf16_block_by_block_too(self) -> None:
        worker = Worker(tiny_env(TEXT_ENCODER_PRECISION="int8"))
        assert "error" not in worker.handle(small_job())
        encoder = editor_of(worker).model.pipe.text_encoder
        assert precision.quantised_linears(encoder.model.visual) == 0
        assert precision.quantised_linears(encoder.model.language_model) > 0


def test_the_load_log_carries_the_plan_the_jobs_report(caplog: pytest.LogCaptureFixture) -> None:
    import json

    with caplog.at_level(logging.INFO, logger="qwen_edit_worker.model"):
        worker = Worker(tiny_env())
        out = worker.handle(small_job())
    logged = [r.getMessage().removeprefix("placement: ") for r in caplog.records
              if r.getMessage().startswith("placement: {")]
    assert [json.loads(line) for line in logged] == [out["model"]["placement"]]


class TestPrecisionAuto:
    @pytest.mark.parametrize(("cuda", "capability", "baked", "chosen"), [
        (True, (8, 6), "bf16", "int8"),  # A5000, 3090: Ampere
        (True, (8, 0), "bf16", "int8"),  # A100
        (True, (8, 9), "bf16", "fp8"),  # L4, 4090, L40S: Ada
        (True, (9, 0), "bf16", "fp8"),  # H100, H200
        (True, (7, 5), "bf16", "bf16"),  # T4: neither
        (False, None, "bf16", "bf16"),  # a CPU
        (True, (9, 0), "int8", "int8"),  # a quantised bake decides
    ])
    def test_auto_chooses_by_compute_capability(self, cuda: bool, capability: tuple[int, int] | None, baked: str,
                                                chosen: str) -> None:
        assert precision.resolve("auto", cuda, capability, baked) == chosen
        assert precision.resolve("int8", cuda, capability, baked) == "int8"  # explicit values pass through

    def test_auto_on_a_cpu_loads_bf16_and_reports_it(self) -> None:
        out = Worker(tiny_env(PRECISION="auto")).handle(small_job())
        assert "error" not in out, out
        assert out["model"]["precision"] == "bf16" and out["model"]["quantised_at_load"] == {}

    def test_the_text_encoder_takes_no_auto(self) -> None:
        error = Worker(tiny_env(TEXT_ENCODER_PRECISION="auto")).handle(small_job())["error"]
        assert error == "TEXT_ENCODER_PRECISION: must be one of bf16, int8, fp8 (got 'auto')"

    def test_the_command_sizes_auto_as_the_quantised_transformer(self) -> None:
        import json
        import subprocess
        import sys

        def info(value: str) -> dict[str, Any]:
            done = subprocess.run([sys.executable, "-m", "qwen_edit_worker.placement", "--gpu-gb", "24",
                                   "--precision", value, "--text-encoder-precision", "int8"],
                                  capture_output=True, text=True, timeout=60, check=True)
            return {k: v for k, v in json.loads(done.stdout).items() if k != "precision"}

        # auto plans for the larger activations of the two it may become (fp8's, measured on the real graph)
        assert info("auto") == info("fp8")
        modes = placement.MODES
        assert modes.index(info("int8")["offload"]) <= modes.index(info("fp8")["offload"])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny edit-2511 pipeline saved as a bf16-style bake would be (unfused, LoRA beside it)."""
    import diffusers

    from qwen_edit_worker.model import tiny
    from qwen_edit_worker.safety import tiny as safety_tiny
    from qwen_edit_worker.weights.variants import VARIANTS

    variant = VARIANTS["edit-2511"]
    folder = tmp_path_factory.mktemp("tiny-bake") / "model"
    getattr(diffusers, variant.pipeline_class)(**tiny.build_components(variant, tiny.base_scheduler())
                                               ).save_pretrained(folder)
    tiny.write_lora(folder / "lightning" / variant.lora_basename)
    safety_tiny.save(folder / "safety_checker")
    return folder


class TestReadByBlock:
    def test_read_fused_and_quantised_block_by_block_equals_load_fuse_quantise_whole(self, tiny_folder: Any
                                                                                     ) -> None:
        """A folder bake with PRECISION=int8: the transformer is built empty and each block is read from the
        memory-mapped files, fused and quantised in turn (the path a 24 GB GPU takes), and the picture equals
        the whole-model path's: load it all, fuse with peft, quantise every layer at once."""
        from qwen_edit_worker.model import tiny

        by_block = Worker({"MODEL_PATH": str(tiny_folder), "WARMUP": "0", "PRECISION": "int8"})
        out = by_block.handle(small_job(seed=4))
        assert "error" not in out, out
        record = out["model"]["quantised_at_load"]["transformer"]
        assert record["where"] == "cpu, block by block from the files"
        assert record["lora_layers"] == len(tiny.LORA_MODULES) * tiny.NUM_LAYERS
        assert out["model"]["lightning_fused"] == "load"

        whole = Worker({"MODEL_PATH": str(tiny_folder), "WARMUP": "0"})
        assert "error" not in whole.handle(small_job(seed=4))
        pipe = editor_of(whole).model.pipe
        precision.quantise_transformer(pipe.transformer, "int8")
        reference = whole.handle(small_job(seed=4))
        read = editor_of(by_block).model.pipe.transformer
        assert precision.quantised_linears(read) == precision.quantised_linears(pipe.transformer) > 0
        assert not any(p.device.type == "meta" for p in read.parameters())
        assert np.array_equal(decode_output_image(out["images"][0]), decode_output_image(reference["images"][0]))

    def test_a_lora_that_matches_nothing_is_a_load_error_block_by_block_too(self, tiny_folder: Any,
                                                                          tmp_path: Any) -> None:
        from qwen_edit_worker.model import tiny

        wrong = tiny.write_lora(tmp_path / "wrong.safetensors", prefix="single_blocks")
        error = Worker({"MODEL_PATH": str(tiny_folder), "WARMUP": "0", "PRECISION": "int8",
                        "LORA_PATH": str(wrong)}).handle(small_job())["error"]
        assert error.startswith("LORA_PATH: ") and "matched no layer" in error

    def test_weights_arrive_in_the_dtype_asked_not_the_empty_models_float32(self, tiny_folder: Any) -> None:
        """The empty (meta) model's parameters are float32: a bf16 read must stay bf16 (before the fix it was
        cast up, doubling each block's bytes on the GPU and leaving norms in float32)."""
        import diffusers

        from qwen_edit_worker.model import by_block

        model, record = by_block.load_transformer(tiny_folder / "transformer", diffusers.QwenImageTransformer2DModel,
                                                  torch.bfloat16, "cpu", "cpu", None, None)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert record["lora_layers"] == 0 and record["blocks"] > len(model.transformer_blocks)


class TestTextEncoderRead:
    def test_read_first_only_where_the_bf16_encoder_fits_the_gpu_alone(self, tmp_path: Any) -> None:
        """A 16 GB card cannot hold the 16.6 GB bf16 encoder: it loads on the host, quantised layer by layer."""
        from qwen_edit_worker.model import choices, sources
        from qwen_edit_worker.settings import Settings

        stored = reference_sizes("bf16", "bf16")
        source = sources.ModelSource(tmp_path, "folder", None, None)
        int8 = Settings.from_env(tiny_env(TEXT_ENCODER_PRECISION="int8"))
        bf16 = Settings.from_env(tiny_env())
        assert choices.encoder_goes_first(int8, source, stored, 24 * GB)
        assert choices.encoder_goes_first(int8, source, stored, None)  # the CPU runs the same path
        assert not choices.encoder_goes_first(int8, source, stored, 16 * GB)
        assert not choices.encoder_goes_first(bf16, source, stored, 80 * GB)  # nothing to quantise
    def test_read_onto_the_device_and_quantised_there_equals_the_whole_loaded_encoder_quantised(
            self, tiny_folder: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
        """A bf16 folder with TEXT_ENCODER_PRECISION=int8: the encoder is read on its own, straight onto the device
        (device_map), quantised there and handed to the pipeline, which does not read a second one; the picture
        equals the old path's (the pipeline loads the encoder whole, then it is quantised)."""
        import transformers

        encoder_class = transformers.Qwen2_5_VLForConditionalGeneration
        original = encoder_class.from_pretrained
        loads: list[Any] = []

        def counted(*args: Any, **kwargs: Any) -> Any:
            loads.append(kwargs.get("device_map"))
            return original(*args, **kwargs)

        monkeypatch.setattr(encoder_class, "from_pretrained", counted)
        with caplog.at_level(logging.INFO, logger="qwen_edit_worker.model.text_encoder"):
            read = Worker({"MODEL_PATH": str(tiny_folder), "WARMUP": "0", "TEXT_ENCODER_PRECISION": "int8"})
            out = read.handle(small_job(seed=6))
        assert "error" not in out, out
        assert loads == [{"": "cpu"}]  # one read, onto the device: the pipeline's from_pretrained took it as given
        record = out["model"]["quantised_at_load"]
        assert list(record) == ["text_encoder"]
        assert record["text_encoder"]["where"] == "cpu, read from the files onto it"
        assert any("text encoder read cpu, read from the files onto it" in r.getMessage() for r in caplog.records)
        encoder = editor_of(read).model.pipe.text_encoder
        assert precision.quantised_linears(encoder.model.visual) == 0

        loads.clear()
        whole = Worker({"MODEL_PATH": str(tiny_folder), "WARMUP": "0"})
        assert "error" not in whole.handle(small_job(seed=6))
        assert len(loads) == 1 and loads[0] != {"": "cpu"}  # the old path: read by the pipeline's from_pretrained
        pipe = editor_of(whole).model.pipe
        precision.quantise_text_encoder(pipe.text_encoder, "int8")
        reference = whole.handle(small_job(seed=6))
        assert precision.quantised_linears(encoder) == precision.quantised_linears(pipe.text_encoder) > 0
        assert np.array_equal(decode_output_image(out["images"][0]), decode_output_image(reference["images"][0]))

    def test_a_folder_whose_text_encoder_is_not_a_transformers_class_is_a_load_error(self, tmp_path: Any) -> None:
        import json

        from qwen_edit_worker.errors import ModelLoadError
        from qwen_edit_worker.model import text_encoder

        (tmp_path / "model_index.json").write_text(json.dumps({"text_encoder": ["diffusers", "NoSuchEncoder"]}))
        with pytest.raises(ModelLoadError) as caught:
            text_encoder.encoder_class(tmp_path)
        assert str(caught.value).startswith("MODEL_PATH: ") and "diffusers.NoSuchEncoder" in str(caught.value)
