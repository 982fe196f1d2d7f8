"""The safety checker (SAFETY_CHECKER, input.enable_safety_checker): which jobs are checked, what a flagged
picture becomes (black, same size and format), that it never leaves the worker (response, bucket, the SDK's
job loop), how the checker is fed and loaded, and that its bytes count in the placement.

The checker is the real class (transformers' ViTForImageClassification) at a tiny size with random weights
(qwen_edit_worker.safety.tiny); TINY_SAFETY_FLAGS chooses which pictures of a batch it flags."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import decode_output_image, small_job, tiny_env
from fake_queue import deployed_worker, serve_queue
from qwen_edit_worker import placement, safety
from qwen_edit_worker.errors import ModelLoadError, RequestError
from qwen_edit_worker.safety import tiny
from qwen_edit_worker.safety.classifier import to_model_input
from qwen_edit_worker.serving.worker import Worker
from test_outputs import bucket_env, client, s3  # noqa: F401 (s3: the loopback S3 server fixture)


def ok(out: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in out, out
    return out


# ---- which jobs are checked ----

@pytest.mark.parametrize(("mode", "requested", "checked", "warns"), [
    ("request", None, True, False), ("request", True, True, False), ("request", False, False, False),
    ("always", None, True, False), ("always", True, True, False),
    ("off", None, False, False), ("off", False, False, False), ("off", True, False, True),
])
def test_policy(mode: str, requested: bool | None, checked: bool, warns: bool) -> None:
    got, warning = safety.wanted(mode, requested)
    assert got is checked and (warning is not None) is warns


def test_always_refuses_a_callers_false_naming_the_field_and_the_setting(worker_for: Any) -> None:
    with pytest.raises(RequestError, match="SAFETY_CHECKER=always"):
        safety.wanted("always", False)
    out = worker_for(SAFETY_CHECKER="always").handle(small_job(enable_safety_checker=False))
    assert out["error"].startswith("input.enable_safety_checker: false is not allowed") and "SAFETY_CHECKER" in \
        out["error"]


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, [True], {"on": True}])
def test_bad_enable_safety_checker_values_are_clean_errors(worker_for: Any, value: Any) -> None:
    out = worker_for().handle(small_job(enable_safety_checker=value))
    assert out["error"].startswith("input.enable_safety_checker: must be true or false (got ")


def test_bad_settings_are_named() -> None:
    for env, name in (({"SAFETY_CHECKER": "sometimes"}, "SAFETY_CHECKER"), ({"TINY_SAFETY_FLAGS": "-1"},
                                                                               "TINY_SAFETY_FLAGS")):
        out = Worker(tiny_env(**env)).handle(small_job())
        assert out["error"].startswith(f"{name}: must be"), out


# ---- through Worker.handle ----

def test_default_checks_every_picture_and_keeps_the_tiny_models_pictures(worker_for: Any) -> None:
    checked = ok(worker_for().handle(small_job(num_images=2)))
    plain = ok(worker_for(SAFETY_CHECKER="off").handle(small_job(num_images=2)))
    assert checked["has_nsfw_concepts"] == [False, False]
    assert [item["nsfw"] for item in checked["images"]] == [False, False]
    assert checked["timing"]["safety_ms"] > 0 and checked["model"]["safety_checker"]["model"] == "tiny"
    for a, b in zip(checked["images"], plain["images"], strict=True):
        assert np.array_equal(decode_output_image(a), decode_output_image(b))
    # Nothing checked: no verdicts at all, and the check costs nothing.
    assert "has_nsfw_concepts" not in plain and all("nsfw" not in item for item in plain["images"])
    assert plain["timing"]["safety_ms"] == 0 and plain["model"]["safety_checker"] is None


def test_a_callers_false_skips_the_check_and_off_with_true_says_so(worker_for: Any) -> None:
    out = ok(worker_for().handle(small_job(enable_safety_checker=False)))
    assert "has_nsfw_concepts" not in out and out["timing"]["safety_ms"] == 0
    out = ok(worker_for(SAFETY_CHECKER="off").handle(small_job(enable_safety_checker=True)))
    assert "has_nsfw_concepts" not in out and any("SAFETY_CHECKER=off" in w for w in out["warnings"])


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_flag_all_gives_black_pictures_of_the_same_size_and_format(worker_for: Any, fmt: str) -> None:
    job = small_job(num_images=2, width=96, height=64, output_format=fmt)
    out = ok(worker_for(TINY_SAFETY_FLAGS="all").handle(job))
    assert out["has_nsfw_concepts"] == [True, True]
    for item in out["images"]:
        assert item["nsfw"] is True and item["format"] == fmt and (item["width"], item["height"]) == (96, 64)
        decoded = Image.open(io.BytesIO(__import__("base64").b64decode(item["image"])))
        assert decoded.format.lower() == fmt and decoded.size == (96, 64)
        assert np.asarray(decoded.convert("RGB")).max() <= 2  # black (lossy codecs may leave a trace of 1-2)


def test_flag_one_of_a_batch_blacks_out_that_one_only(worker_for: Any) -> None:
    reference = ok(worker_for().handle(small_job(num_images=3)))
    out = ok(worker_for(TINY_SAFETY_FLAGS="1").handle(small_job(num_images=3)))
    assert out["has_nsfw_concepts"] == [False, True, False]
    assert [item["nsfw"] for item in out["images"]] == [False, True, False]
    pixels = [decode_output_image(item) for item in out["images"]]
    assert pixels[1].max() == 0 and decode_output_image(reference["images"][1]).max() > 0
    for index in (0, 2):
        assert np.array_equal(pixels[index], decode_output_image(reference["images"][index]))


# ---- the bucket: a flagged picture is never uploaded ----

def test_a_flagged_picture_never_reaches_the_bucket(s3: str, worker_for: Any) -> None:  # noqa: F811
    reference = ok(worker_for().handle(small_job(num_images=2, seed=21)))
    job = {**small_job(num_images=2, seed=21), "id": "safety-bucket"}  # its own prefix: the server is shared
    out = ok(Worker(bucket_env(s3, TINY_SAFETY_FLAGS="0")).handle(job))
    assert out["has_nsfw_concepts"] == [True, False]
    bucket = client(s3)
    stored = {}
    for entry in bucket.list_objects_v2(Bucket="edits", Prefix="safety-bucket/")["Contents"]:
        body = bucket.get_object(Bucket="edits", Key=entry["Key"])["Body"].read()
        stored[entry["Key"]] = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert sorted(stored) == ["safety-bucket/0-21.png", "safety-bucket/1-22.png"]
    flagged = decode_output_image(reference["images"][0])
    assert stored["safety-bucket/0-21.png"].max() == 0  # the black stand-in, not the picture
    assert not any(np.array_equal(pixels, flagged) for pixels in stored.values())
    assert np.array_equal(stored["safety-bucket/1-22.png"], decode_output_image(reference["images"][1]))


# ---- handler.py under the SDK's job loop ----

def test_deployed_flagged_picture_never_leaves_the_worker(tmp_path: Path, worker_for: Any) -> None:
    reference = ok(worker_for().handle(small_job(num_images=2, seed=5)))
    flagged_b64 = reference["images"][1]["image"]
    with serve_queue() as queue, deployed_worker(queue, tmp_path / "worker.log", TINY_SAFETY_FLAGS="1",
                                                 LOG_LEVEL="INFO") as process:
        queue.put({**small_job(num_images=2, seed=5), "id": "screened"},
                  {**small_job(enable_safety_checker="no"), "id": "bad-flag"})
        try:
            results = queue.wait_done(["screened", "bad-flag"], 240)
        except TimeoutError:
            pytest.fail(f"no answer (exit {process.poll()}):\n{(tmp_path / 'worker.log').read_text()[-3000:]}")
    output = results["screened"].body["output"]
    assert output["has_nsfw_concepts"] == [False, True] and output["timing"]["safety_ms"] > 0
    assert decode_output_image(output["images"][1]).max() == 0
    assert np.array_equal(decode_output_image(output["images"][0]), decode_output_image(reference["images"][0]))
    everything_posted = json.dumps([e.body for e in queue.events if e.body is not None])
    assert flagged_b64 not in everything_posted and flagged_b64[:200] not in everything_posted
    assert results["bad-flag"].body["error"].startswith("input.enable_safety_checker: must be true or false")
    log = (tmp_path / "worker.log").read_text()
    assert "nsfw 1/2" in log and flagged_b64[:200] not in log


# ---- the checker itself ----

def test_tensor_preprocessing_matches_the_models_own_image_processor() -> None:
    from transformers import ViTImageProcessor

    pixels = (np.random.default_rng(3).random((2, 300, 420, 3)) * 255).astype(np.uint8)
    processor = ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    theirs = processor(images=list(pixels), return_tensors="pt")["pixel_values"]
    ours = to_model_input(pixels, (224, 224), [0.5] * 3, [0.5] * 3, torch.float32, "cpu")
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.15  # PIL's resize vs torch's


def test_the_decision_follows_the_classifier() -> None:
    checker = tiny.build("cpu", torch.float32)
    pixels = (np.random.default_rng(0).random((3, 64, 80, 3)) * 255).astype(np.uint8)
    assert checker.check(pixels) == [False, False, False]
    with torch.no_grad():  # the nsfw logit made the larger one: every picture flagged
        checker.model.classifier.bias.copy_(torch.tensor([-tiny.QUIET_BIAS, tiny.QUIET_BIAS]))
    flags, screened = checker.screen(np.broadcast_to(pixels, pixels.shape))  # read-only input: copied, not written
    assert flags == [True, True, True] and screened.max() == 0 and pixels.max() > 0


def save_checker(folder: Path, labels: dict[int, str]) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=224, patch_size=16, id2label=labels, label2id={v: k for k, v in labels.items()})
    ViTForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder


def test_load_locate_and_refusals(tmp_path: Path) -> None:
    baked = tmp_path / "models" / "edit-2511"
    folder = save_checker(baked / safety.FOLDER, {0: "normal", 1: "nsfw"})
    (baked / "manifest.json").write_text(json.dumps({"safety_checker": {"repo": safety.REPO, "commit": "c" * 40}}))
    # The slim image: the model from elsewhere, the checker beside the baked LoRA.
    assert safety.locate(tmp_path / "elsewhere", tmp_path / "none", "edit-2511", baked / "lightning") == folder
    assert safety.locate(tmp_path / "elsewhere", tmp_path / "models", "edit-2511") == folder
    checker = safety.load(folder, "cpu", torch.float32)
    assert checker.source == f"{safety.REPO}@{'c' * 12}" and checker.size == (224, 224)
    assert len(checker.check(np.zeros((2, 32, 32, 3), np.uint8))) == 2
    assert placement.folder_bytes(folder) == checker.resident_bytes() // 2  # fp32 as saved, counted as bf16
    with pytest.raises(ModelLoadError, match=r"^SAFETY_CHECKER: no safety checker is baked .*SAFETY_CHECKER=off"):
        safety.locate(tmp_path / "x", tmp_path / "y", "edit-2511")
    assert safety.locate_for("off", tmp_path / "x", tmp_path / "y", "edit-2511") is None
    other = save_checker(tmp_path / "cats", {0: "cat", 1: "dog"})
    with pytest.raises(ModelLoadError, match="SAFETY_CHECKER: .* not an nsfw classifier"):
        safety.load(other, "cpu", torch.float32)


def test_the_checker_counts_in_the_placement_in_every_mode() -> None:
    sizes = {"transformer": 20 * placement.GB, "text_encoder": 9 * placement.GB, "vae": placement.GB // 4}
    with_checker = sizes | {"safety_checker": placement.GB // 5}
    for mode in placement.MODES:
        a, b = placement.plan(sizes, 80 * placement.GB, mode), placement.plan(with_checker, 80 * placement.GB, mode)
        assert b.resident_bytes - a.resident_bytes == placement.GB // 5
        assert b.need_bytes - a.need_bytes == placement.GB // 5


def test_the_tiny_models_plan_counts_the_tiny_checker(worker_for: Any) -> None:
    worker = worker_for()
    ok(worker.handle(small_job()))
    model = worker.model.get()[0].model
    off = worker_for(SAFETY_CHECKER="off")
    ok(off.handle(small_job()))
    assert model.placement.resident_bytes - off.model.get()[0].model.placement.resident_bytes == \
        model.safety.resident_bytes() > 0
