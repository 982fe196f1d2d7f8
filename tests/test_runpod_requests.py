"""Requests written for RunPod's public Qwen edit endpoints, run here unchanged.

The bodies are their docs' own examples (runpod_examples.json, copied verbatim); only the
hosts of their example URLs are pointed at a file server on loopback that serves a picture (and,
for the LoRA endpoint, a LoRA) at the same paths.  `size` ("W*H") gives exactly that output, off the
model's 16-pixel grid too, and `image_url` is what their callers read.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import decode_output_image, small_job, tiny_env
from lora_files import FileServer
from qwen_edit_worker.schema import ModelDefaults, parse_request
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights.variants import VARIANTS
from runpod_examples import EXAMPLES, LISTED_SIZES, VARIANT_OF, example, served, serving_examples

NO_SIDES = {"width": None, "height": None}  # small_job's width and height left out


@pytest.fixture(scope="module")
def server() -> Iterator[FileServer]:
    with serving_examples() as files:
        yield files


@pytest.fixture(scope="module")
def worker_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Worker]:
    cache = str(tmp_path_factory.mktemp("lora-cache"))
    workers = {variant: Worker(tiny_env(MODEL_VARIANT=variant, ALLOW_LOOPBACK_URLS="1", LORA_CACHE_DIR=cache))
               for variant in ("edit", "edit-2511")}
    return workers.__getitem__


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result.get("error")
    return result


def data_uri_pixels(uri: str) -> np.ndarray:
    header, data = uri.split(",", 1)
    assert header == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


class TestTheirExamples:
    @pytest.mark.parametrize("name", sorted(EXAMPLES))
    def test_accepted_with_their_meaning(self, name: str) -> None:
        raw = example(name)["input"]
        variant = VARIANTS[VARIANT_OF[name]]
        for lightning in (True, False):  # a base-model worker too (their negative_prompt "" is no negative prompt)
            request = parse_request(raw, variant, ModelDefaults.for_model(variant, lightning))
            assert request.seed is None and request.output_format == "png"  # seed -1: a random seed
            assert request.prompt == raw["prompt"] and len(request.images) == 1
            if "size" in raw:
                assert request.exact_size == request.size == (1024, 1024)
            else:
                assert request.exact_size is None and request.size is None and request.megapixels == 1.0
        assert [(item.path, item.scale) for item in request.loras] == [(i["path"], i["scale"])
                                                                         for i in raw.get("loras", [])]
        if "negative_prompt" in raw:
            assert request.negative_prompt == " " and request.true_cfg_scale == 4.0  # the base model's blank one

    @pytest.mark.timeout(900)  # a 1 MP job is slow on the tiny model's VAE with 2 cores: ~20 s alone, minutes if shared
    @pytest.mark.parametrize("name", ["qwen-image-edit", "qwen-image-edit-2511-lora"])  # 2511: test_deployed.py
    def test_runs_and_answers_image_url(self, name: str, server: FileServer,
                                        worker_of: Callable[[str], Worker]) -> None:
        out = ok(worker_of(VARIANT_OF[name]).handle(served(example(name), server.url)))
        [item] = out["images"]
        expected = (1024, 1024) if "size" in example(name)["input"] else (1248, 832)  # else 1 MP at the input's 3:2
        assert (item["width"], item["height"]) == expected and decode_output_image(item).shape == expected[::-1] + (3,)
        assert out["image_url"] == "data:image/png;base64," + item["image"]  # no bucket: the picture itself
        assert isinstance(out["cost"], dict) and "usd" in out["cost"]  # their number is our cost.usd
        assert len(out["model"]["loras"]) == len(example(name)["input"].get("loras", []))


class TestExactSize:
    @pytest.mark.timeout(900)
    def test_1536_by_1080_is_exact(self, server: FileServer, worker_of: Callable[[str], Worker]) -> None:
        body = example("qwen-image-edit-2511")
        body["input"]["size"] = "1536*1080"  # off the 16 grid: the model works at 1536x1088
        out = ok(worker_of("edit-2511").handle(served(body, server.url)))
        [item] = out["images"]
        assert (item["width"], item["height"]) == (1536, 1080)
        assert decode_output_image(item).shape == (1080, 1536, 3)
        assert data_uri_pixels(out["image_url"]).shape == (1080, 1536, 3)

    def test_off_grid_is_the_working_size_picture_resized(self, worker_for: Callable[..., Worker]) -> None:
        """"100*90" works at 96x96 (the nearest sizes on the grid) and resizes that very picture."""
        worker = worker_for()
        exact = ok(worker.handle(small_job(**NO_SIDES, size="100*90", seed=3)))["images"][0]
        grid = ok(worker.handle(small_job(width=96, height=96, seed=3)))["images"][0]
        assert (exact["width"], exact["height"]) == (100, 90)
        expected = Image.fromarray(decode_output_image(grid)).resize((100, 90), Image.Resampling.LANCZOS)
        assert np.array_equal(decode_output_image(exact), np.asarray(expected))

    def test_on_grid_size_is_the_same_as_width_and_height(self, worker_for: Callable[..., Worker]) -> None:
        worker = worker_for()
        by_size = ok(worker.handle(small_job(**NO_SIDES, size="64*128", seed=4)))["images"][0]
        by_sides = ok(worker.handle(small_job(width=64, height=128, seed=4)))["images"][0]
        assert by_size == by_sides

    @pytest.mark.parametrize(("fields", "message"), [
        ({"size": "1024x1024", **NO_SIDES}, 'input.size: must be a string "W*H" with W and H whole numbers from 64 '
                                             "to 2048, e.g. \"1024*1024\" (got '1024x1024')"),
        ({"size": "4096*1024", **NO_SIDES}, "(got '4096*1024')"),
        ({"size": 1024, **NO_SIDES}, "(got 1024)"),
        ({"size": "1024*1024"}, "input.size: give either size or width and height, not both"),
        ({"size": "1024*1024", **NO_SIDES, "megapixels": 1}, "give either size or megapixels"),
    ])
    def test_bad_size_is_a_clean_error(self, worker_for: Callable[..., Worker], fields: dict[str, Any],
                                       message: str) -> None:
        error = worker_for().handle(small_job(**fields))["error"]
        assert message in error and error.startswith("input.size: ") and "Traceback" not in error


def test_listed_sizes_all_parse() -> None:
    variant = VARIANTS["edit-2511"]
    defaults = ModelDefaults.for_model(variant, lightning=True)
    for size in LISTED_SIZES:
        request = parse_request({"prompt": "p", "images": ["x"], "size": size}, variant, defaults)
        width, height = (int(side) for side in size.split("*"))
        assert request.exact_size == (width, height)
        assert request.size == (width, (height + 8) // 16 * 16)  # 1080 works at 1088; the others are on the grid
