"""The OpenAI Images API's edit call, translated to this worker's job input and back.

Why this exists: most app code already speaks OpenAI's Images API (`client.images.edit(...)`), and
RunPod's own Qwen-Image-Edit worker serves it, so a load-balancing endpoint answers it too.  The
OpenAI Python SDK sends a multipart form: one file as `image`, several as `image[]`, every other
value as text (`n`, `size`, `response_format`, `output_format`, `output_compression`, `model`, and
whatever `extra_body` adds: here `seed`, `negative_prompt`, `num_inference_steps`, `true_cfg_scale`
and `loras` as JSON text).  This module turns that form into the job input schema.py validates,
so both front doors accept exactly the same edits, and names every error by the field the caller
sent (`input.num_images` is `n` here).  Pure: no aiohttp, no torch.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ModelLoadError, RequestError, SettingsError, WorkerError, describe
from ...pictures.uploads import UploadError
from ...weights.variants import Variant

IMAGE_FIELDS = ("image", "image[]")
TEXT_FIELDS = ("prompt", "n", "size", "response_format", "output_format", "output_compression", "model", "stream",
               "seed", "negative_prompt", "num_inference_steps", "true_cfg_scale", "loras")
RESPONSE_FORMATS = ("b64_json", "url")
# This worker's input field -> the form field an OpenAI caller sent for it.
PARAMS = {"num_images": "n", "output_quality": "output_compression", "width": "size", "height": "size",
          "images": "image"}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class EditCall:
    """One validated form: the job input for the Worker, and how the caller wants the pictures back."""

    job_input: dict[str, Any]
    response_format: str


def model_names(variant: Variant) -> tuple[str, ...]:
    """The names `model` may take: the Hugging Face repo, its last part, or the variant."""
    return variant.repo.lower(), variant.repo.split("/")[-1].lower(), variant.name


def parse_form(form: Mapping[str, Sequence[Any]], variant: Variant | None, bucket: bool) -> EditCall:
    """The form (field -> its values: text, or (filename, bytes) for a file) as an EditCall; RequestError if bad."""
    unknown = sorted(k for k in form if k not in IMAGE_FIELDS + TEXT_FIELDS)
    if unknown:
        allowed = ", ".join(IMAGE_FIELDS + TEXT_FIELDS)
        raise RequestError(unknown[0], f"not a field of this edit call; allowed: {allowed}")
    text = {name: _one_text(form, name) for name in TEXT_FIELDS if name in form}
    sources = [_source(item, name) for name in IMAGE_FIELDS for item in form.get(name, ())]
    job: dict[str, Any] = {"prompt": text.get("prompt")}
    if len(sources) == 1:
        job["image"] = sources[0]
    elif sources:
        job["images"] = sources
    for name, target in (("n", "num_images"), ("seed", "seed"), ("num_inference_steps", "num_inference_steps"),
                         ("output_compression", "output_quality")):
        if name in text:
            job[target] = _number(text[name], target, int)
    if "true_cfg_scale" in text:
        job["true_cfg_scale"] = _number(text["true_cfg_scale"], "true_cfg_scale", float)
    for name in ("negative_prompt", "output_format"):
        if name in text:
            job[name] = text[name]
    if "loras" in text:
        try:
            job["loras"] = json.loads(text["loras"])
        except ValueError as err:
            raise RequestError("input.loras", f"must be JSON text: the list of LoRAs a job takes ({err})") from None
    job.update(_size(text.get("size", "auto")))
    _check_model(text.get("model"), variant)
    if text.get("stream", "false").lower() != "false":
        raise RequestError("stream", "streaming is not offered: each call answers with the finished pictures")
    response_format = text.get("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise RequestError("response_format", f"must be b64_json or url (got {describe(response_format)})")
    if response_format == "url" and not bucket:
        raise RequestError("response_format", "url needs a bucket configured on the worker (BUCKET_ENDPOINT_URL "
                           "and its keys); ask for b64_json")
    return EditCall({k: v for k, v in job.items() if v is not None}, response_format)


def images_response(output: Mapping[str, Any], response_format: str) -> dict[str, Any]:
    """The worker's output as OpenAI's ImagesResponse, plus this worker's seed, timing, cost and warnings."""
    key = "url" if response_format == "url" else "b64_json"
    images = output["images"]
    first = images[0]
    return {
        "created": int(time.time()),
        "data": [{key: item["image"]} for item in images],
        "output_format": first["format"],
        "size": f"{first['width']}x{first['height']}",
        "seed": output["seed"],
        "timing": output["timing"],
        "cost": output["cost"],
        "warnings": output["warnings"],
    }


def param_for(subject: str) -> str | None:
    """The field an OpenAI caller knows for an error's subject: `input.num_images` -> `n`, `input.seed` -> `seed`."""
    if subject == "input":
        return None
    name = subject.removeprefix("input.")
    head, bracket, rest = name.partition("[")
    return PARAMS.get(head, head) + bracket + rest


def error_status(err: Exception) -> tuple[int, str | None, str | None, str]:
    """(HTTP status, param, code, message) for a job's error."""
    if isinstance(err, RequestError):
        param = param_for(err.subject)
        renamed = param is not None and param != err.subject.removeprefix("input.")
        return 400, param, None, f"{param}: {err.message}" if renamed else str(err)
    if isinstance(err, (SettingsError, ModelLoadError)):
        return 503, None, "model_unavailable", str(err)
    if isinstance(err, UploadError):
        return 502, None, "upload_failed", str(err)
    if isinstance(err, WorkerError):  # e.g. `output`: the answer would be too large for what was asked
        return 400, None, None, str(err)
    if type(err).__name__ == "OutOfMemoryError":
        return 503, None, "out_of_memory", "out of GPU memory; this worker asks to be replaced: retry"
    return 500, None, None, f"internal error ({type(err).__name__}); details are in the worker log"


def _one_text(form: Mapping[str, Sequence[Any]], name: str) -> str:
    values = form[name]
    if len(values) != 1 or not isinstance(values[0], str):
        raise RequestError(name, "must be sent once, as text")
    return values[0]


def _source(item: Any, field: str) -> str:
    """A file as base64 (the job input's inline form); text passes as it is (a URL or base64)."""
    if isinstance(item, str):
        return item
    _, data = item
    if not data:
        raise RequestError(field, "the file is empty")
    return base64.b64encode(data).decode()


def _number(value: str, target: str, kind: type) -> int | float:
    try:
        return kind(value.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise RequestError(f"input.{target}", f"must be {what} (got {describe(value)})") from None


def _size(value: str) -> dict[str, int]:
    if value.strip().lower() in ("auto", ""):
        return {}
    match = _SIZE.match(value.strip().lower())
    if match is None:
        raise RequestError("size", f'must be "auto" or "WIDTHxHEIGHT", e.g. "1024x1024" (got {describe(value)})')
    return {"width": int(match[1]), "height": int(match[2])}


def _check_model(model: str | None, variant: Variant | None) -> None:
    if model is None or variant is None or model.strip().lower() in model_names(variant):
        return
    raise RequestError("model", f"this worker serves {variant.repo} (MODEL_VARIANT {variant.name}); "
                       f"name it or leave model out (got {describe(model)})")
