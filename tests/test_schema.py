"""Every validation rule of the job input, and the one error shape ("input.<field>: ...")."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_edit_worker.errors import RequestError
from qwen_edit_worker.schema import FIELDS, ModelDefaults, parse_request
from qwen_edit_worker.weights.variants import VARIANTS

PLUS = VARIANTS["edit-2511"]
EDIT = VARIANTS["edit"]
LIGHTNING = ModelDefaults.for_model(PLUS, lightning=True)
IMG = "aGVsbG8="  # any non-empty string: the schema checks shape, images_in checks content


def parse(variant: Any = PLUS, defaults: ModelDefaults = LIGHTNING, **fields: Any) -> Any:
    raw = {"prompt": "make it red", "image": IMG}
    raw.update(fields)
    return parse_request({k: v for k, v in raw.items() if v is not ...}, variant, defaults)


def rejects(field: str, fragment: str, variant: Any = PLUS, **fields: Any) -> None:
    with pytest.raises(RequestError) as caught:
        parse(variant, **fields)
    assert caught.value.subject == field
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")
    assert "Traceback" not in str(caught.value)


class TestDefaults:
    def test_lightning_defaults(self) -> None:
        request = parse()
        assert (request.num_inference_steps, request.true_cfg_scale, request.negative_prompt) == (3, 1.0, "")
        assert request.seed is None and request.megapixels == 1.0 and request.size is None
        assert (request.num_images, request.output_format, request.output_quality) == (1, "png", 95)

    def test_base_model_defaults_follow_the_variant(self) -> None:
        request = parse(defaults=ModelDefaults.for_model(PLUS, lightning=False))
        assert (request.num_inference_steps, request.true_cfg_scale) == (40, 4.0)
        assert request.negative_prompt.strip() == ""  # a blank negative prompt, as the official examples
        assert parse(EDIT, defaults=ModelDefaults.for_model(EDIT, lightning=False)).num_inference_steps == 50


class TestInputShape:
    def test_not_an_object(self) -> None:
        with pytest.raises(RequestError, match="^input: must be a JSON object"):
            parse_request(["a"], PLUS, LIGHTNING)

    def test_unknown_fields_are_named(self) -> None:
        rejects("input", "unknown field(s) guidance, steps", guidance=2, steps=3)
        with pytest.raises(RequestError) as caught:
            parse(stepz=1)
        assert all(name in str(caught.value) for name in FIELDS)


class TestPrompt:
    def test_required(self) -> None:
        rejects("input.prompt", "required", prompt=...)

    @pytest.mark.parametrize("value", ["", "   ", "x" * 2001, 5, ["a"]])
    def test_bounds_and_type(self, value: Any) -> None:
        rejects("input.prompt", "1 to 2000 characters", prompt=value)

    def test_limits_inclusive(self) -> None:
        assert parse(prompt="x" * 2000).prompt == "x" * 2000

    def test_negative_prompt(self) -> None:
        rejects("input.negative_prompt", "0 to 2000", negative_prompt="n" * 2001)
        assert parse(negative_prompt="").negative_prompt == ""


class TestImages:
    def test_one_required(self) -> None:
        rejects("input.image", "required", image=...)

    def test_not_both(self) -> None:
        rejects("input.image", "not both", images=[IMG])

    @pytest.mark.parametrize("value", ["", 3, {"url": "x"}])
    def test_image_must_be_a_string(self, value: Any) -> None:
        rejects("input.image", "non-empty string", image=value)

    def test_images_list_bounds(self) -> None:
        assert parse(image=..., images=[IMG, IMG, IMG]).images == (IMG,) * 3
        rejects("input.images", "1 to 3", image=..., images=[])
        rejects("input.images", "1 to 3", image=..., images=[IMG] * 4)
        rejects("input.images", "1 to 3", image=..., images=IMG)
        rejects("input.images[1]", "non-empty string", image=..., images=[IMG, 5])

    def test_images_only_on_plus_variants(self) -> None:
        rejects("input.images", "edit-2509 or edit-2511", EDIT, image=..., images=[IMG])
        assert parse(VARIANTS["edit-2509"], image=..., images=[IMG, IMG]).image_field == "input.images"


class TestNumbers:
    @pytest.mark.parametrize("value", [-2, 2**64, "5", 1.5, True, None])
    def test_seed(self, value: Any) -> None:
        if value is None:
            assert parse(seed=None).seed is None
            return
        rejects("input.seed", "from -1 to 18446744073709551615", seed=value)

    def test_seed_limits(self) -> None:
        """What broke before: seeds from 2**32 up were refused here (and reduced mod 2**32 from a workflow)."""
        assert parse(seed=-1).seed is None
        assert parse(seed=0).seed == 0 and parse(seed=2**64 - 1).seed == 2**64 - 1
        assert parse(seed=677909188488042).seed == 677909188488042 and parse(seed=2**32).seed == 2**32
        assert parse(seed=5.0).seed == 5  # integral floats are whole numbers

    @pytest.mark.parametrize(("field", "bad", "good"), [
        ("num_inference_steps", [0, 51, 2.5, "3"], [1, 50]),
        ("num_images", [0, 5, False], [1, 4]),
        ("output_quality", [0, 101], [1, 100]),
    ])
    def test_integer_bounds(self, field: str, bad: list[Any], good: list[Any]) -> None:
        for value in bad:
            rejects(f"input.{field}", "whole number", **{field: value})
        for value in good:
            assert getattr(parse(**{field: value}), field) == value

    @pytest.mark.parametrize("value", [0.99, 10.01, float("nan"), float("inf"), "2", False])
    def test_true_cfg_scale_bounds(self, value: Any) -> None:
        rejects("input.true_cfg_scale", "from 1 to 10", true_cfg_scale=value)

    def test_cfg_above_one_needs_a_negative_prompt(self) -> None:
        rejects("input.true_cfg_scale", "negative_prompt", true_cfg_scale=4.0)
        rejects("input.true_cfg_scale", "negative_prompt", true_cfg_scale=4.0, negative_prompt="")
        base = ModelDefaults.for_model(PLUS, lightning=False)
        assert parse(defaults=base, negative_prompt="").negative_prompt == " "  # "": none, the model's blank one
        assert parse(true_cfg_scale=4.0, negative_prompt=" ").negative_prompt == " "
        assert parse(true_cfg_scale=4.0, negative_prompt="blurry").true_cfg_scale == 4.0

    @pytest.mark.parametrize("value", [0.06, 2.01, -1, "1"])
    def test_megapixels_bounds(self, value: Any) -> None:
        rejects("input.megapixels", "from 0.0625 to 2", megapixels=value)

    def test_megapixels_limits(self) -> None:
        assert parse(megapixels=0.0625).megapixels == 0.0625 and parse(megapixels=2).megapixels == 2.0


class TestSize:
    def test_both_or_neither(self) -> None:
        rejects("input.height", "give both or neither", width=512)
        rejects("input.width", "give both or neither", height=512)

    @pytest.mark.parametrize("value", [48, 2064, 100, 512.5])
    def test_bounds_and_multiple(self, value: Any) -> None:
        with pytest.raises(RequestError, match="^input.width: "):
            parse(width=value, height=512)

    def test_valid(self) -> None:
        assert parse(width=64, height=2048).size == (64, 2048)

    def test_not_with_megapixels(self) -> None:
        rejects("input.megapixels", "not both", width=512, height=512, megapixels=1)

    @pytest.mark.parametrize(("value", "working"), [
        ("1024*1024", (1024, 1024)), ("1536*1080", (1536, 1088)), (" 64 * 2048 ", (64, 2048)), ("100*90", (96, 96)),
        ("72*2040", (80, 2048)),
    ])
    def test_size_w_by_h(self, value: str, working: tuple[int, int]) -> None:
        request = parse(size=value)
        assert request.size == working  # the model's 16 grid, nearest (ties up)
        assert request.exact_size == tuple(int(side) for side in value.split("*"))  # the output, exactly

    @pytest.mark.parametrize("value", ["1024x1024", "1024*", "*1024", "1024", "1024*1024*2", "-64*64", "63*64",
                                       "64*2049", "", "1e3*1024", "\u0661\u0660\u0662\u0664*1024", 1024,
                                       [1024, 1024], True])
    def test_bad_size(self, value: object) -> None:
        rejects("input.size", 'must be a string "W*H" with W and H whole numbers from 64 to 2048', size=value)

    def test_size_not_with_width_height_or_megapixels(self) -> None:
        rejects("input.size", "give either size or width and height, not both", size="512*512", width=512, height=512)
        rejects("input.size", "give either size or width, not both", size="512*512", width=512)
        rejects("input.size", "give either size or megapixels, not both", size="512*512", megapixels=1)
        assert parse(size=None, megapixels=1).exact_size is None  # null is absent


class TestOutputFormat:
    def test_formats(self) -> None:
        assert [parse(output_format=f).output_format for f in ("png", "JPEG", "jpg", "webp")] == [
            "png", "jpeg", "jpeg", "webp"]
        rejects("input.output_format", "png, jpeg, webp", output_format="gif")
        rejects("input.output_format", "png, jpeg, webp", output_format=3)
