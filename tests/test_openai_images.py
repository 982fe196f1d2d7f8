"""The OpenAI Images form to this worker's job input, and errors back to OpenAI's field names (pure)."""

from __future__ import annotations

import base64

import pytest

from qwen_edit_worker.errors import ModelLoadError, RequestError, SettingsError
from qwen_edit_worker.serving.http.openai_images import error_status, images_response, param_for, parse_form
from qwen_edit_worker.weights.variants import VARIANTS

V2511 = VARIANTS["edit-2511"]


def form(**fields: str) -> dict[str, list[object]]:
    return {"image": [("a.png", b"PNG")], **{k: [v] for k, v in fields.items()}}


class TestParseForm:
    def test_fields_map_to_the_job_input(self) -> None:
        call = parse_form(form(prompt="p", n="2", size="512x768", output_format="webp", output_compression="70",
                               seed="9", negative_prompt=" ", num_inference_steps="4", true_cfg_scale="2.5",
                               loras='[{"path": "a/b", "scale": 0.5}]', model="qwen-image-edit-2511"), V2511, False)
        assert call.response_format == "b64_json"
        assert call.job_input == {
            "prompt": "p", "image": base64.b64encode(b"PNG").decode(), "num_images": 2, "width": 512, "height": 768,
            "output_format": "webp", "output_quality": 70, "seed": 9, "negative_prompt": " ",
            "num_inference_steps": 4, "true_cfg_scale": 2.5, "loras": [{"path": "a/b", "scale": 0.5}]}

    @pytest.mark.parametrize("size", ["auto", "AUTO", ""])
    def test_size_auto_leaves_the_size_to_the_inputs_aspect_at_1_mp(self, size: str) -> None:
        job = parse_form(form(prompt="p", size=size), V2511, False).job_input
        assert "width" not in job and "height" not in job and "megapixels" not in job  # schema default: 1 MP

    def test_several_files_become_images_one_file_in_an_array_stays_image(self) -> None:
        many = parse_form({"image[]": [("a", b"1"), ("b", b"2")], "prompt": ["p"]}, V2511, False).job_input
        assert many["images"] == [base64.b64encode(b).decode() for b in (b"1", b"2")]
        one = parse_form({"image[]": [("a", b"1")], "prompt": ["p"]}, V2511, False).job_input
        assert one["image"] == base64.b64encode(b"1").decode() and "images" not in one

    def test_url_needs_a_bucket(self) -> None:
        assert parse_form(form(prompt="p", response_format="url"), V2511, True).response_format == "url"
        with pytest.raises(RequestError, match="response_format: url needs a bucket"):
            parse_form(form(prompt="p", response_format="url"), V2511, False)

    @pytest.mark.parametrize("model", ["Qwen/Qwen-Image-Edit-2511", "qwen-image-edit-2511", "edit-2511"])
    def test_model_names_the_variant_served(self, model: str) -> None:
        parse_form(form(prompt="p", model=model), V2511, False)
        with pytest.raises(RequestError, match="this worker serves Qwen/Qwen-Image-Edit-2509"):
            parse_form(form(prompt="p", model=model), VARIANTS["edit-2509"], False)

    def test_a_field_sent_twice_is_refused(self) -> None:
        with pytest.raises(RequestError, match="prompt: must be sent once"):
            parse_form({**form(), "prompt": ["a", "b"]}, V2511, False)


class TestErrors:
    @pytest.mark.parametrize(("subject", "param"), [
        ("input.seed", "seed"), ("input.num_images", "n"), ("input.output_quality", "output_compression"),
        ("input.width", "size"), ("input.images[2]", "image[2]"), ("input.image", "image"),
        ("input.loras[0].path", "loras[0].path"), ("input", None), ("size", "size")])
    def test_param_is_the_field_the_caller_sent(self, subject: str, param: str | None) -> None:
        assert param_for(subject) == param

    def test_status_per_error_kind(self) -> None:
        assert error_status(RequestError("input.seed", "bad")) == (400, "seed", None, "input.seed: bad")
        assert error_status(RequestError("input.num_images", "bad")) == (400, "n", None, "n: bad")
        assert error_status(SettingsError("CONCURRENCY", "bad"))[:3] == (503, None, "model_unavailable")
        assert error_status(ModelLoadError("MODEL_PATH", "bad"))[0] == 503
        status, _, _, message = error_status(KeyError("secret detail"))
        assert status == 500 and message == "internal error (KeyError); details are in the worker log"

    def test_images_response_is_openais_shape(self) -> None:
        output = {"images": [{"image": "QUJD", "type": "base64", "format": "png", "width": 64, "height": 48,
                              "seed": 1}], "seed": 1, "timing": {"total_ms": 5}, "cost": {"usd": None}, "warnings": []}
        answer = images_response(output, "b64_json")
        assert answer["data"] == [{"b64_json": "QUJD"}] and answer["size"] == "64x48" and answer["created"] > 0
        assert images_response(output, "url")["data"] == [{"url": "QUJD"}]
