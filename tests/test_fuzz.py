"""Property tests: any JSON in any field, and random or mutated picture bytes, give either a valid
result or a clear error; no exception ever escapes the schema, the decoder or the handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import b64_picture, encode_picture, picture, small_job
from qwen_edit_worker.errors import RequestError
from qwen_edit_worker.pictures.images_in import decode_image
from qwen_edit_worker.schema import FIELDS, EditRequest, ModelDefaults, parse_request
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights.variants import VARIANTS

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=60),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
FIELD_NAMES = st.sampled_from([*FIELDS, "unknown", "Prompt", ""])
SAMPLES = [encode_picture(picture(48, 40), fmt) for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP")]


@settings(max_examples=400, deadline=None)
@given(raw=st.dictionaries(FIELD_NAMES, JSON, max_size=6) | JSON, variant=st.sampled_from(list(VARIANTS)))
def test_schema_accepts_or_names_the_field(raw: Any, variant: str) -> None:
    defaults = ModelDefaults.for_model(VARIANTS[variant], lightning=True)
    try:
        assert isinstance(parse_request(raw, VARIANTS[variant], defaults), EditRequest)
    except RequestError as err:
        assert str(err).startswith(("input", "input.")) and ": " in str(err)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_random_bytes_decode_or_fail_clearly(data: bytes) -> None:
    _decode(data)


@settings(max_examples=300, deadline=None)
@given(sample=st.sampled_from(SAMPLES), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                      min_size=1, max_size=8), cut=st.integers(0, 10**6))
def test_mutated_pictures_decode_or_fail_clearly(sample: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(sample)
    for position, value in edits:
        data[position % len(data)] = value
    _decode(bytes(data[: max(8, cut % (len(data) + 1))]))


def _decode(data: bytes) -> None:
    try:
        result = decode_image(data, "input.image", max_pixels=10**6)
    except RequestError as err:
        assert err.subject == "input.image"
        return
    assert isinstance(result, Image.Image) and result.mode == "RGB" and min(result.size) >= 32


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.dictionaries(FIELD_NAMES, JSON | st.just(b64_picture(40, 40)), max_size=3))
def test_handler_never_raises(worker_for: Callable[..., Worker], overrides: dict[str, Any]) -> None:
    for name in ("width", "height"):  # keep accidental valid sizes small so the suite stays fast
        value = overrides.get(name)
        assume(not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 128))
    assume(not (isinstance(overrides.get("megapixels"), (int, float)) and "width" not in overrides
                and "height" not in overrides))
    job = small_job()
    job["input"].update(overrides)
    result = worker_for("edit-2511").handle(job)
    assert isinstance(result, dict)
    if "error" in result:
        assert isinstance(result["error"], str) and "Traceback" not in result["error"]
    else:
        assert result["images"] and all(item["type"] == "base64" for item in result["images"])
        assert result["seed"] == result["images"][0]["seed"]


def test_handler_survives_odd_job_shapes(worker_for: Callable[..., Worker]) -> None:
    for job in ({}, {"input": None}, {"input": []}, {"id": 5, "input": "x"}, {"input": {"prompt": None}}):
        assert worker_for("edit-2511").handle(job)["error"].startswith("input")
    assert "error" not in worker_for("edit-2511").handle(small_job(image=b64_picture(40, 40)))
