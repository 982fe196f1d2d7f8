"""ComfyUI's Qwen-Image-Edit templates through the worker (tiny model): worker-comfyui's answer, the same
pixels twice, the same pixels as the plain request they mean, clean errors, and uploads to a bucket.

What broke before: a worker-comfyui request was an unknown field; nothing answered `images` as
`[{"filename", "type", "data"}]`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from comfy_fixtures import EDIT, EDIT_2511, INFLATION, INT8_2511, PLUS_2509, RELIGHT, VARIANT, comfy_job, template, tiny
from conftest import tiny_env
from lora_files import FileServer, Route, lora_bytes
from qwen_edit_worker import comfy
from qwen_edit_worker.serving.worker import Worker
from test_outputs import bucket_env, client, s3  # noqa: F401 (s3: the loopback S3 server fixture)


def pixels(item: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["data"]))).convert("RGB"))


def ok(out: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in out, out.get("error")
    return out


@pytest.fixture(scope="module")
def loras() -> Iterator[FileServer]:
    with FileServer({"/relight.safetensors": Route(lora_bytes(41))}) as server:
        yield server


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Worker]:
    cache: dict[tuple[str, ...], Worker] = {}
    folder = str(tmp_path_factory.mktemp("comfy-lora-cache"))

    def get(variant: str, **env: str) -> Worker:
        key = (variant, *sorted(f"{k}={v}" for k, v in env.items()))
        if key not in cache:
            cache[key] = Worker(tiny_env(MODEL_VARIANT=variant, ALLOW_LOOPBACK_URLS="1", LORA_CACHE_DIR=folder, **env))
        return cache[key]

    return get


class TestTemplatesRun:
    @pytest.mark.parametrize("name", [EDIT, PLUS_2509, EDIT_2511, INT8_2511])
    def test_answer_in_worker_comfyuis_shape(self, name: str, worker: Callable[..., Worker]) -> None:
        out = ok(worker(VARIANT[name]).handle(comfy_job(tiny(template(name)))))
        [item] = out["images"]
        assert set(item) == {"filename", "type", "data"} and item["type"] == "base64"
        assert item["filename"] == {EDIT: "ComfyUI_00001_.png", PLUS_2509: "Qwen_Image_2509_00001.png",
                                    EDIT_2511: "Qwen_Edit_2511_00001_.png", INT8_2511: "Qwen_Edit_2511_00001.png"}[name]
        assert pixels(item).shape == (80, 120, 3)  # ComfyUI's size for the 96x64 picture at 0.01 MP
        assert base64.b64decode(item["data"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert {"seed", "timing", "cost", "model", "warnings"} <= set(out) and "image_url" not in out
        assert out["timing"]["steps"] == 4 and out["model"]["variant"] == VARIANT[name]

    def test_a_lora_template(self, worker: Callable[..., Worker], loras: FileServer) -> None:
        """The 2509 relight template: the Lightning LoRA (fused) and a style LoRA (fetched, applied)."""
        workflow = tiny(template(RELIGHT))
        workflow["10:118"]["inputs"]["lora_name"] = f"{loras.url}/relight.safetensors"
        out = ok(worker("edit-2509").handle(comfy_job(workflow)))
        [applied] = out["model"]["loras"]
        assert applied["source"] == "url" and applied["scale"] == 1.0 and applied["layers"] > 0
        plain = ok(worker("edit-2509").handle(comfy_job(tiny(template(RELIGHT)) | {"10:66": {
            "class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["10:89", 0], "shift": 3}}})))
        assert not np.array_equal(pixels(out["images"][0]), pixels(plain["images"][0]))  # the LoRA changed it

    def test_a_base_model_template_as_shipped(self, worker: Callable[..., Worker], loras: FileServer) -> None:
        """The 2511 LoRA template unedited but for sizes and its LoRA's URL: 40 steps, cfg 4, on LIGHTNING=0."""
        workflow = tiny(template(INFLATION), turbo=None)
        workflow["89:90"]["inputs"]["lora_name"] = f"{loras.url}/relight.safetensors"
        workflow["89:65"]["inputs"]["steps"] = 2  # 40 steps of CFG are slow on a shared CPU; the rest as shipped
        out = ok(worker("edit-2511", LIGHTNING="0").handle(comfy_job(workflow)))
        assert out["timing"]["steps"] == 2 and out["images"][0]["filename"] == "Qwen_Edit_2511_00001_.png"
        assert any("base-model scheduler" in w for w in out["warnings"])


class TestSamePixels:
    def test_the_same_graph_twice(self, worker: Callable[..., Worker]) -> None:
        job = comfy_job(tiny(template(EDIT_2511)))
        first, second = (ok(worker("edit-2511").handle(job)) for _ in range(2))
        assert first["images"] == second["images"] and first["seed"] == second["seed"]

    def test_a_graph_and_its_plain_request(self, worker: Callable[..., Worker]) -> None:
        job = comfy_job(tiny(template(EDIT_2511)))
        graph = ok(worker("edit-2511").handle(job))
        images = [item["image"] for item in job["input"]["images"]]
        plain = ok(worker("edit-2511").handle({"id": "plain", "input": {
            "prompt": template(EDIT_2511)["170:151"]["inputs"]["prompt"], "images": images, "size": "120*80",
            "seed": template(EDIT_2511)["170:169"]["inputs"]["seed"], "num_inference_steps": 4}}))
        assert np.array_equal(pixels(graph["images"][0]), pixels({"data": plain["images"][0]["image"]}))
        assert graph["seed"] == plain["seed"]


class TestSixtyFourBitSeeds:
    """What broke before: seeds above 2**32-1 ran mod 2**32 and the answer reported the reduced seed; and torch's
    CPU generator seeds its state from the low 32 bits only, so seeds 2**32 apart drew the same noise."""

    SEED = 677909188488042  # the seed ComfyUI's own 2511 template ships with

    def test_the_templates_seed_is_run_and_reported(self, worker: Callable[..., Worker]) -> None:
        assert template(EDIT_2511)["170:169"]["inputs"]["seed"] == self.SEED > 2**32
        out = ok(worker("edit-2511").handle(comfy_job(tiny(template(EDIT_2511)))))
        assert out["seed"] == self.SEED and not any("seed" in w for w in out["warnings"])

    def test_seeds_2_to_the_32_apart_give_different_pixels(self, worker: Callable[..., Worker]) -> None:
        answers = []
        for seed in (self.SEED, self.SEED + 2**32):
            workflow = tiny(template(EDIT_2511))
            workflow["170:169"]["inputs"]["seed"] = seed
            answers.append(ok(worker("edit-2511").handle(comfy_job(workflow))))
        assert [a["seed"] for a in answers] == [self.SEED, self.SEED + 2**32]
        assert not np.array_equal(pixels(answers[0]["images"][0]), pixels(answers[1]["images"][0]))

    def test_the_largest_seed_runs_and_2_to_the_64_is_refused(self, worker: Callable[..., Worker]) -> None:
        workflow = tiny(template(EDIT_2511))
        workflow["170:169"]["inputs"]["seed"] = 2**64 - 1
        assert ok(worker("edit-2511").handle(comfy_job(workflow)))["seed"] == 2**64 - 1
        workflow["170:169"]["inputs"]["seed"] = 2**64
        error = worker("edit-2511").handle(comfy_job(workflow))["error"]
        assert error == ("input.workflow.170:169.inputs.seed: must be from 0 to 18446744073709551615 "
                         "(got 18446744073709551616)")


class TestCleanErrorsThroughTheWorker:
    def test_bad_base64_of_a_second_picture_names_its_index(self, worker: Callable[..., Worker]) -> None:
        job = comfy_job(tiny(template(EDIT_2511)))
        job["input"]["images"][1]["image"] = "not*base64"
        error = worker("edit-2511").handle(job)["error"]
        assert error == "input.images[1]: not valid base64 image data, a data URI or an http(s) URL"

    def test_steps_above_the_workers_bound_name_the_node(self, worker: Callable[..., Worker]) -> None:
        workflow = tiny(template(EDIT_2511))
        workflow["170:165"]["inputs"]["value"] = 60  # through the switch and a PrimitiveInt
        error = worker("edit-2511").handle(comfy_job(workflow))["error"]
        assert error == "input.workflow.170:169.inputs.steps: must be a whole number from 1 to 50 (got 60)"

    def test_a_missing_lora_dir_file_names_the_node(self, worker: Callable[..., Worker], tmp_path: Any) -> None:
        (tmp_path / "other.safetensors").write_bytes(lora_bytes(1))
        error = worker("edit-2509", LORA_DIR=str(tmp_path)).handle(comfy_job(tiny(template(RELIGHT))))["error"]
        assert error.startswith("input.workflow.10:118.inputs.lora_name: no Qwen-Image-Edit-2509-Relight.safetensors "
                                "in LORA_DIR (it has: other.safetensors)")


def test_with_a_bucket_the_answer_is_s3_urls(s3: str) -> None:  # noqa: F811 (the loopback S3 server fixture)
    worker = Worker(bucket_env(s3))
    bad = comfy_job(tiny(template(EDIT_2511)), job_id="rejected")
    bad["input"]["workflow"]["170:169"]["inputs"]["sampler_name"] = "dpmpp_2m"
    assert worker.handle(bad)["error"].startswith("input.workflow.170:169.inputs.sampler_name:")
    out = ok(worker.handle(comfy_job(tiny(template(EDIT_2511)), job_id="job-s3")))
    [item] = out["images"]
    assert item["type"] == "s3_url" and item["filename"] == "Qwen_Edit_2511_00001_.png"
    assert item["data"].startswith(f"{s3}/edits/job-s3/Qwen_Edit_2511_00001_.png")
    fetched = requests.get(item["data"], timeout=10)
    assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"
    listed = client(s3).list_objects_v2(Bucket="edits")  # the server is shared: each job has its own prefix
    keys = [o["Key"] for o in listed.get("Contents", []) if o["Key"].startswith(("job-s3/", "rejected/"))]
    assert keys == ["job-s3/Qwen_Edit_2511_00001_.png"]  # nothing of the rejected job
    assert comfy.workflow_job({"prompt": "p", "image": "x"}, worker.settings) is None  # type: ignore[arg-type]
