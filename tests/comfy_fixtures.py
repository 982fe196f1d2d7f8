"""ComfyUI's Qwen-Image-Edit templates as a caller of worker-comfyui would send them, made tiny for the CPU.

The fixtures are the official templates flattened to the API format (tests/comfy_templates/); the
tests edit copies only: the working size (FluxKontextImageScale's ~1 MP would take seconds a job on
the tiny model, so it becomes ImageScaleToTotalPixels at 0.01 MP, 120x80 for the 96x64 test picture),
the templates' `enable_turbo_mode` switch (PrimitiveBoolean) and LoRA names.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from conftest import b64_picture

TEMPLATES = Path(__file__).resolve().parent / "comfy_templates"
EDIT, PLUS_2509, RELIGHT, EDIT_2511, INT8_2511, INFLATION = (
    "image_qwen_image_edit", "image_qwen_image_edit_2509", "image_qwen_image_edit_2509_relight",
    "image_qwen_image_edit_2511", "image_qwen_image_edit_2511_int8", "image-qwen_image_edit_2511_lora_inflation")
VARIANT = {EDIT: "edit", PLUS_2509: "edit-2509", RELIGHT: "edit-2509", EDIT_2511: "edit-2511",
           INT8_2511: "edit-2511", INFLATION: "edit-2511"}
TINY_MEGAPIXELS = 0.01


def template(name: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / f"{name}.json").read_text())


def nodes_of(workflow: dict[str, Any], class_type: str) -> list[str]:
    return sorted(node_id for node_id, node in workflow.items() if isinstance(node, dict)
                  and node.get("class_type") == class_type)


def tiny(workflow: dict[str, Any], turbo: bool | None = True, megapixels: float = TINY_MEGAPIXELS) -> dict[str, Any]:
    """A copy at a tiny working size, with the templates' turbo switch set (None: as shipped)."""
    out = copy.deepcopy(workflow)
    for node_id in nodes_of(out, "FluxKontextImageScale"):
        out[node_id] = {"class_type": "ImageScaleToTotalPixels", "_meta": {"title": "tiny for the CPU"},
                        "inputs": {**out[node_id]["inputs"], "upscale_method": "lanczos", "megapixels": megapixels}}
    if "78" in out and "93" in out:  # the edit template feeds the picture unscaled: scale it as the others
        for node in out.values():
            for name, value in node["inputs"].items():
                if value == ["78", 0] and node["class_type"] != "ImageScaleToTotalPixels":
                    node["inputs"][name] = ["93", 0]
        out["93"]["inputs"]["megapixels"] = megapixels
    if turbo is not None:
        for node_id in nodes_of(out, "PrimitiveBoolean"):
            out[node_id]["inputs"]["value"] = turbo
    return out


def images_for(workflow: dict[str, Any], seed: int = 0) -> list[dict[str, str]]:
    names = [workflow[node_id]["inputs"]["image"] for node_id in nodes_of(workflow, "LoadImage")]
    return [{"name": name, "image": "data:image/png;base64," + b64_picture(seed=seed + i)}
            for i, name in enumerate(names)]


def comfy_job(workflow: dict[str, Any], job_id: str = "comfy-job", seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "input": {"workflow": workflow, "images": images_for(workflow, seed), **extra}}
