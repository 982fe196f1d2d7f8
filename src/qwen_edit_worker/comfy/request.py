"""worker-comfyui's request (`input.workflow` with `input.images`) turned into this worker's own `input`.

Why this exists: callers of RunPod's worker-comfyui send `{"workflow": <API-format graph>,
"images": [{"name", "image"}], "comfy_org_api_key"}` (runpod-workers/worker-comfyui handler.py,
validate_input).  The graph is read as one edit (interpret.py) and written as the plain request
it means, which schema.parse_request then validates like any other, so a graph and its plain
twin run the same code and give the same pixels.  Errors from anywhere in the job are renamed
back to the field the caller sent (`input.workflow.<id>.inputs.<name>`, `input.images[<i>]`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestError, describe
from ..pictures import images_in, sizing
from ..schema import FIELDS
from ..settings import Settings
from . import files, resolution
from .deployment import Deployment
from .graph import Graph, Node
from .interpret import Plan, interpret

COMFY_FIELDS = ("workflow", "images", "comfy_org_api_key")
IMAGE_FIELDS = ("name", "image")
PREVIEW_LETTERS = "abcdefghijklmnopqrstupvxyz"  # nodes.py PreviewImage's alphabet, as ComfyUI spells it


@dataclass
class ComfyJob:
    """A worker-comfyui request read as this worker's `input`, with the way back for errors and answers."""

    input: dict[str, Any]
    fields: dict[str, str]  # this worker's field -> the caller's
    filenames: list[list[str]]  # per returned output node, one name per picture
    warnings: list[str] = field(default_factory=list)

    def rename(self, err: RequestError) -> RequestError:
        subject = self.fields.get(err.subject)
        return err if subject is None else RequestError(subject, err.message)

    def object_names(self) -> list[str]:
        """The bucket object names of the pictures: the first output node's file names."""
        return self.filenames[0]


def workflow_job(raw: Any, settings: Settings) -> ComfyJob | None:
    """The job's input as a worker-comfyui request, or None when it is this worker's own shape."""
    if isinstance(raw, str):  # worker-comfyui also takes `input` as JSON text
        try:
            parsed = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(parsed, Mapping) or "workflow" not in parsed:
            return None
        raw = parsed
    if not isinstance(raw, Mapping):
        return None
    if "workflow" not in raw:
        items = raw.get("images")
        if isinstance(items, list) and any(isinstance(item, Mapping) for item in items):
            raise RequestError("input.images", "a list of {name, image} objects is worker-comfyui's shape, which "
                                               "needs input.workflow; this worker's own input.images is a list of "
                                               "image strings")
        return None
    mixed = sorted(k for k in raw if k not in COMFY_FIELDS and k in FIELDS)
    if mixed:
        raise RequestError(f"input.{mixed[0]}", f"give either worker-comfyui's request ({', '.join(COMFY_FIELDS)}) or "
                                                f"this worker's own fields ({', '.join(mixed)}, ...), not both")
    unknown = sorted(str(k) for k in raw if k not in COMFY_FIELDS)
    if unknown:
        raise RequestError("input", f"unknown field(s) {', '.join(unknown)}; with input.workflow (worker-comfyui's "
                                    f"request) the fields are {', '.join(COMFY_FIELDS)}")
    return translate(raw, settings)


def deployment(settings: Settings) -> Deployment:
    names = [settings.variant.lora_basename] + ([settings.lora_path.name] if settings.lora_path else [])
    return Deployment(settings.variant, settings.lightning, files.lightning_names(names), settings.precision,
                      settings.text_encoder_precision, settings.lora_dir is not None)


def translate(raw: Mapping[str, Any], settings: Settings) -> ComfyJob:
    if raw.get("workflow") is None:
        raise RequestError("input.workflow", "required: a ComfyUI workflow in the API format (Workflow > Export (API))")
    sources = _images(raw.get("images"))
    warnings = _api_key(raw.get("comfy_org_api_key"))
    plan = interpret(Graph.parse(raw["workflow"]), deployment(settings))
    limits = images_in.InputLimits(settings.max_input_bytes, settings.max_input_pixels)
    out, fields = _plain(plan, sources, limits)
    used = {p.name for p in plan.pictures} | ({plan.latent_picture.name} if plan.latent_picture else set())
    warnings += [f"input.images[{i}] ({describe(name)}): no LoadImage reads it; ignored"
                 for name, (i, _) in sources.items() if name not in used]
    size = sizing.parse_size(out["size"]) if "size" in out else (out["width"], out["height"])
    assert size is not None
    return ComfyJob(out, fields, _file_names(plan, size, out.get("num_images", 1)), plan.warnings + warnings)


def _images(raw: Any) -> dict[str, tuple[int, str]]:
    """input.images as worker-comfyui defines it: [{"name", "image"}], names unique; name -> (index, image)."""
    if raw is None:
        return {}
    if not isinstance(raw, list) or not all(isinstance(i, Mapping) and "name" in i and "image" in i for i in raw):
        raise RequestError("input.images", "'images' must be a list of objects with 'name' and 'image' keys")
    out: dict[str, tuple[int, str]] = {}
    for index, item in enumerate(raw):
        unknown = sorted(str(k) for k in item if k not in IMAGE_FIELDS)
        if unknown:
            raise RequestError(f"input.images[{index}]", f"unknown field(s) {', '.join(unknown)}; allowed: name, image")
        name, image = item["name"], item["image"]
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"input.images[{index}].name", "must be the file name a LoadImage node reads")
        if name in out:
            raise RequestError(f"input.images[{index}].name", f"{describe(name)} is also input.images"
                                                              f"[{out[name][0]}]'s; names must be unique")
        url = isinstance(image, str) and image.lstrip()[:8].lower().startswith(("http://", "https://"))
        if not isinstance(image, str) or not image.strip() or url:
            raise RequestError(f"input.images[{index}]", "image must be base64 image data or a data URI "
                                                         "(data:image/png;base64,...), as worker-comfyui takes")
        out[name] = (index, image.strip())
    return out


def _api_key(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, str):
        raise RequestError("input.comfy_org_api_key", "must be a string")
    return ["input.comfy_org_api_key: not used: this worker runs no Comfy.org API nodes (the key is neither "
            "stored nor logged)"] if value else []


def _plain(plan: Plan, sources: dict[str, tuple[int, str]],
           limits: images_in.InputLimits) -> tuple[dict[str, Any], dict[str, str]]:
    def source(node: Node, name: str) -> tuple[int, str]:
        if name not in sources:
            raise RequestError(node.field("image"), f"{describe(name)} is not in input.images (names: "
                                                    f"{', '.join(map(describe, sources)) or 'none'})")
        return sources[name]

    found = [source(p.load, p.name) for p in plan.pictures]
    out: dict[str, Any] = {"prompt": plan.prompt[0], "seed": plan.seed,
                           "num_inference_steps": plan.steps, "true_cfg_scale": plan.cfg, "output_format": "png"}
    fields = {"input.prompt": plan.prompt[1], "input.seed": plan.sampler.field("seed"),
              "input.num_inference_steps": plan.sampler.field("steps"),
              "input.true_cfg_scale": plan.sampler.field("cfg"), "input": "input.workflow"}
    if len(found) == 1:
        out["image"], fields["input.image"] = found[0][1], f"input.images[{found[0][0]}]"
    else:
        out["images"] = [src for _, src in found]
        fields.update({f"input.images[{k}]": f"input.images[{i}]" for k, (i, _) in enumerate(found)})
        fields["input.images"] = plan.pictures[0].load.field("image")
    if plan.cfg > 1:
        out["negative_prompt"] = plan.negative[0] if plan.negative[0].strip() else " "  # ComfyUI encodes a blank one
        fields["input.negative_prompt"] = plan.negative[1]
    (width, height), batch, size_field, batch_field = _size(plan, sources, limits)
    if width % sizing.MULTIPLE or height % sizing.MULTIPLE:
        out["size"] = f"{width}*{height}"  # off the 16 grid: exactly ComfyUI's size, the model at the nearest
    else:
        out["width"], out["height"] = width, height
    fields.update(dict.fromkeys(("input.width", "input.height", "input.size", "input.megapixels"), size_field))
    if batch != 1:
        out["num_images"] = batch
    fields["input.num_images"] = batch_field
    if plan.loras:
        out["loras"] = [{"path": path, "scale": scale} for _, path, scale in plan.loras]
        fields["input.loras"] = plan.loras[0][0].field("lora_name")
        for k, (node, _, _) in enumerate(plan.loras):
            fields.update({f"input.loras[{k}]": node.field(), f"input.loras[{k}].path": node.field("lora_name"),
                           f"input.loras[{k}].scale": node.field("strength_model")})
    return out, fields


def _size(plan: Plan, sources: dict[str, tuple[int, str]],
          limits: images_in.InputLimits) -> tuple[tuple[int, int], int, str, str]:
    """The edit's output size as the caller's ComfyUI makes it, its batch, and the fields that set them."""
    if plan.latent_size is not None:
        width, height, batch = plan.latent_size
        size_field, batch_field = plan.latent.field("width"), plan.latent.field("batch_size")
    else:
        picture = plan.latent_picture
        assert picture is not None
        if picture.name not in sources:
            raise RequestError(picture.load.field("image"), f"{describe(picture.name)} is not in input.images")
        index, source = sources[picture.name]
        width, height = images_in.picture_size(source, f"input.images[{index}]", limits)
        for scaler in picture.scalers:
            if scaler.megapixels is None:
                width, height = resolution.kontext_size(width, height)
            else:
                width, height = resolution.total_pixels_size(width, height, scaler.megapixels, scaler.steps)
        size_field = picture.scalers[-1].field if picture.scalers else plan.latent.field("pixels")
        batch, batch_field = 1, plan.latent.field()
    width, height = resolution.latent_size(width, height)
    if not (sizing.MIN_SIDE <= min(width, height) and max(width, height) <= sizing.MAX_SIDE):
        raise RequestError(size_field, f"the edit would be {width}x{height} (ComfyUI's size, on the 8-pixel latent "
                                       f"grid); this worker works at {sizing.MIN_SIDE} to {sizing.MAX_SIDE} px a "
                                       "side: scale the picture (ImageScaleToTotalPixels, FluxKontextImageScale) or "
                                       "the latent")
    return (width, height), batch, size_field, batch_field


def _file_names(plan: Plan, size: tuple[int, int], count: int) -> list[list[str]]:
    """Each returned output node's file names; a second node with the same prefix counts on from the first."""
    taken: dict[str, int] = {}
    names = []
    for node, prefix in plan.outputs:
        if node.class_type == "PreviewImage":  # nodes.py: prefix_append = "_temp_" + 5 random letters
            prefix += "_temp_" + "".join(secrets.choice(PREVIEW_LETTERS) for _ in range(5))
        key = f"{node.class_type == 'SaveImageAdvanced'}:{prefix}"
        start = taken.get(key, 1)
        names.append(resolution.file_names(prefix, size, count, advanced=node.class_type == "SaveImageAdvanced",
                                           start=start))
        taken[key] = start + count
    return names
