"""The job input schema: every field, its type, default and bounds, validated in one pass.

Why this exists: a worker on a public endpoint gets whatever clients send.  Each field is
described once in FIELDS (the input table in docs/api.md mirrors it), and any violation is a
RequestError naming the field (`input.<name>`) and what is allowed.  Pure: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RequestError, describe
from .loras.request import LoraItem, parse_loras
from .pictures import sizing
from .weights.variants import Variant

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**64 - 1  # torch's generators take any 64-bit seed; ComfyUI's KSampler the same range
RANDOM_SEEDS = 2**32  # a random seed (-1, or none) is drawn below this: exact in every JSON reader, JavaScript's too
OUTPUT_FORMATS = ("png", "jpeg", "webp")
FIELDS = (
    "prompt", "image", "images", "negative_prompt", "size", "seed", "num_inference_steps",
    "true_cfg_scale", "megapixels", "width", "height", "num_images", "output_format",
    "output_quality", "loras", "enable_safety_checker",
)


@dataclass(frozen=True)
class ModelDefaults:
    """Request defaults that follow the loaded model (Lightning or base)."""

    num_inference_steps: int
    true_cfg_scale: float
    negative_prompt: str

    @classmethod
    def for_model(cls, variant: Variant, lightning: bool) -> ModelDefaults:
        if lightning:
            return cls(variant.lightning_steps, 1.0, "")
        # The base model's usual settings: 40-50 steps with true CFG 4 and a blank negative prompt.
        return cls(variant.base_steps, variant.base_true_cfg_scale, " ")


@dataclass(frozen=True)
class EditRequest:
    """A validated edit job."""

    prompt: str
    images: tuple[str, ...]  # image sources as sent (URL, data URI or base64), 1 to 3
    image_field: str  # "image" or "images", for error messages about the sources
    negative_prompt: str
    seed: int | None  # None: choose a random seed
    num_inference_steps: int
    true_cfg_scale: float
    megapixels: float
    size: tuple[int, int] | None  # the working (width, height): explicit, or input.size's on the grid; else megapixels
    exact_size: tuple[int, int] | None  # input.size as asked: the output is resized to it when off the 16 grid
    num_images: int
    output_format: str
    output_quality: int
    loras: tuple[LoraItem, ...] = ()  # request-time LoRAs (loras/request.py), applied on top of Lightning
    enable_safety_checker: bool | None = None  # None: not given (SAFETY_CHECKER decides; safety/policy.py)

    def sources(self) -> list[tuple[str, str]]:
        """(source, field name for errors) per picture: input.image, or input.images[i]."""
        if self.image_field == "input.image":
            return [(self.images[0], self.image_field)]
        return [(source, f"{self.image_field}[{i}]") for i, source in enumerate(self.images)]


def parse_request(raw: Any, variant: Variant, defaults: ModelDefaults, max_loras: int = 3) -> EditRequest:
    """Validate a job's `input`; raise RequestError naming the first bad field."""
    if not isinstance(raw, Mapping):
        raise RequestError("input", f"must be a JSON object with a prompt and an image (got {type(raw).__name__})")
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:
        raise RequestError("input", f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")

    prompt = _text(raw, "prompt", None, 1)
    images, image_field = _image_sources(raw, variant)
    negative = _text(raw, "negative_prompt", defaults.negative_prompt, 0) or defaults.negative_prompt  # "": none
    seed = _integer(raw, "seed", -1, -1, MAX_SEED)
    steps = _integer(raw, "num_inference_steps", defaults.num_inference_steps, 1, 50)
    cfg = _number(raw, "true_cfg_scale", defaults.true_cfg_scale, 1.0, 10.0)
    if cfg > 1.0 and not negative:
        raise RequestError(
            "input.true_cfg_scale",
            'above 1.0 needs an input.negative_prompt (CFG compares the two; " " is the usual blank one)',
        )
    megapixels = _number(raw, "megapixels", 1.0, 0.0625, 2.0)
    exact = _exact_size(raw)
    size = sizing.nearest_working_size(exact) if exact is not None else _explicit_size(raw)
    if size is not None and "megapixels" in raw:
        raise RequestError("input.megapixels", "give either megapixels or width and height, not both")
    fmt = raw.get("output_format", "png")
    fmt = {"jpg": "jpeg"}.get(fmt.lower(), fmt.lower()) if isinstance(fmt, str) else fmt
    if fmt not in OUTPUT_FORMATS:
        raise RequestError("input.output_format", f"must be one of {', '.join(OUTPUT_FORMATS)} (got {describe(fmt)})")
    return EditRequest(
        prompt=prompt,
        images=images,
        image_field=image_field,
        negative_prompt=negative,
        seed=None if seed == -1 else seed,
        num_inference_steps=steps,
        true_cfg_scale=cfg,
        megapixels=megapixels,
        size=size,
        exact_size=exact,
        num_images=_integer(raw, "num_images", 1, 1, 4),
        output_format=fmt,
        output_quality=_integer(raw, "output_quality", 95, 1, 100),
        loras=parse_loras(raw.get("loras"), max_loras),
        enable_safety_checker=_boolean(raw, "enable_safety_checker"),
    )


def _image_sources(raw: Mapping[str, Any], variant: Variant) -> tuple[tuple[str, ...], str]:
    has_image, has_images = raw.get("image") is not None, raw.get("images") is not None
    if has_image and has_images:
        raise RequestError("input.image", "give either image or images, not both")
    if has_image:
        return (_source(raw["image"], "input.image"),), "input.image"
    if not has_images:
        raise RequestError("input.image", "required: an http(s) URL, a data URI or base64 image data")
    if variant.max_images == 1:
        raise RequestError(
            "input.images", f"multi-image input needs MODEL_VARIANT edit-2509 or edit-2511 (this worker runs "
            f"{variant.name}); send one picture as input.image"
        )
    items = raw["images"]
    if not isinstance(items, list) or not 1 <= len(items) <= variant.max_images:
        raise RequestError("input.images", f"must be a list of 1 to {variant.max_images} images")
    return tuple(_source(item, f"input.images[{i}]") for i, item in enumerate(items)), "input.images"


def _boolean(raw: Mapping[str, Any], name: str) -> bool | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"input.{name}", f"must be true or false (got {describe(value)})")
    return value


def _source(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(field, "must be a non-empty string: an http(s) URL, a data URI or base64 image data")
    return value.strip()


def _text(raw: Mapping[str, Any], name: str, default: str | None, min_chars: int) -> str:
    value = raw.get(name)
    if value is None:
        if default is None:
            raise RequestError(f"input.{name}", f"required: a string of 1 to {MAX_PROMPT_CHARS} characters")
        return default
    if not isinstance(value, str) or not min_chars <= len(value.strip() if min_chars else value) <= MAX_PROMPT_CHARS:
        raise RequestError(
            f"input.{name}", f"must be a string of {min_chars} to {MAX_PROMPT_CHARS} characters (got {describe(value)})"
        )
    return value


def _checked(raw: Mapping[str, Any], name: str, default: Any, convert: Callable[[Any], Any | None],
             low: float, high: float, kind: str) -> Any:
    value = raw.get(name)
    if value is None:
        return default
    number = None if isinstance(value, bool) else convert(value)
    if number is None or not low <= number <= high:
        raise RequestError(f"input.{name}", f"must be {kind} from {_num(low)} to {_num(high)} (got {describe(value)})")
    return number


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _as_int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _integer(raw: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    return _checked(raw, name, default, _as_int, low, high, "a whole number")


def _number(raw: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    return _checked(raw, name, default, _as_float, low, high, "a number")


def _explicit_size(raw: Mapping[str, Any]) -> tuple[int, int] | None:
    given = [n for n in ("width", "height") if raw.get(n) is not None]
    if not given:
        return None
    if len(given) == 1:
        missing = "height" if given == ["width"] else "width"
        raise RequestError(f"input.{missing}", "width and height go together: give both or neither")
    width = _integer(raw, "width", 0, 64, 2048)
    height = _integer(raw, "height", 0, 64, 2048)
    for name, value in (("width", width), ("height", height)):
        if value % 16:
            raise RequestError(f"input.{name}", f"must be a multiple of 16 from 64 to 2048 (got {value})")
    return width, height


def _exact_size(raw: Mapping[str, Any]) -> tuple[int, int] | None:
    """`input.size`, "W*H" as RunPod's public Qwen edit endpoints take it; None when absent."""
    value = raw.get("size")
    if value is None:
        return None
    others = [n for n in ("width", "height", "megapixels") if raw.get(n) is not None]
    if others:
        raise RequestError("input.size", f"give either size or {' and '.join(others)}, not both")
    size = sizing.parse_size(value) if isinstance(value, str) else None
    if size is None:
        raise RequestError("input.size", f'must be a string "W*H" with W and H whole numbers from {sizing.MIN_SIDE} '
                           f'to {sizing.MAX_SIDE}, e.g. "1024*1024" (got {describe(value)})')
    return size
