"""worker-comfyui's request read as this worker's own, without a model: ComfyUI's tables, the official
templates' translation, and every request that cannot be honoured as one clean error naming its field.

What broke before: a worker-comfyui client had to be rewritten for this worker; `input.workflow` was
an unknown field.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest

from comfy_fixtures import (
    EDIT,
    EDIT_2511,
    INFLATION,
    INT8_2511,
    PLUS_2509,
    RELIGHT,
    VARIANT,
    comfy_job,
    images_for,
    nodes_of,
    template,
    tiny,
)
from qwen_edit_worker import comfy
from qwen_edit_worker.comfy import resolution
from qwen_edit_worker.comfy.nodes import NODES
from qwen_edit_worker.errors import RequestError
from qwen_edit_worker.schema import ModelDefaults, parse_request
from qwen_edit_worker.settings import Settings


def settings(variant: str = "edit-2511", **env: str) -> Settings:
    return Settings.from_env({"TINY_MODEL": "1", "MODEL_VARIANT": variant, **env})


def translate(workflow: dict[str, Any], variant: str = "edit-2511", **extra: Any) -> comfy.ComfyJob:
    job = comfy.workflow_job(comfy_job(workflow, **extra)["input"], settings(variant))
    assert job is not None
    return job


def error_of(raw: Any, variant: str = "edit-2511", **env: str) -> str:
    with pytest.raises(RequestError) as caught:
        comfy.workflow_job(raw, settings(variant, **env))
    return str(caught.value)


class TestComfyTables:
    """Pinned from ComfyUI's source (comfy_extras/nodes_flux.py, nodes_post_processing.py, nodes.py)."""

    @pytest.mark.parametrize(("size", "expected"), [
        ((1200, 800), (1248, 832)), ((1000, 1000), (1024, 1024)), ((800, 1200), (832, 1248)),
        ((4000, 1000), (1568, 672)), ((96, 64), (1248, 832)), ((1920, 1080), (1392, 752)),
    ])
    def test_kontext_preferred_resolution(self, size: tuple[int, int], expected: tuple[int, int]) -> None:
        assert resolution.kontext_size(*size) == expected

    def test_kontext_table_is_comfyuis(self) -> None:
        assert len(resolution.KONTEXT_RESOLUTIONS) == 17 and resolution.KONTEXT_RESOLUTIONS[0] == (672, 1568)
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in resolution.KONTEXT_RESOLUTIONS)

    def test_total_pixels_rounding(self) -> None:
        assert resolution.total_pixels_size(96, 64, 0.01) == (125, 84)  # then the 8 px latent grid: 120x80
        assert resolution.total_pixels_size(1200, 800, 1.0) == (1254, 836)
        assert resolution.total_pixels_size(1200, 800, 1.0, 64) == (1280, 832)
        assert resolution.latent_size(125, 84) == (120, 80)

    def test_file_names(self) -> None:
        now = time.struct_time((2026, 12, 3, 9, 5, 7, 0, 0, 0))
        assert resolution.file_names("ComfyUI", (64, 64), 2, advanced=False) == ["ComfyUI_00001_.png",
                                                                                  "ComfyUI_00002_.png"]
        assert resolution.file_names("Qwen_Image_2509", (64, 64), 1, advanced=True) == ["Qwen_Image_2509_00001.png"]
        assert resolution.file_names("edits/%year%-%month%_%width%x%height%", (120, 80), 1, advanced=False,
                                     now=now) == ["2026-12_120x80_00001_.png"]  # the folder part is subfolder
        assert resolution.prefix_problem("../outside") is not None and resolution.prefix_problem("a/b") is None

    def test_node_table_inputs(self) -> None:
        assert set(NODES["KSampler"].inputs) == {"model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                                 "positive", "negative", "latent_image", "denoise"}
        assert NODES["TextEncodeQwenImageEditPlus"].inputs["image3"].required is False
        assert NODES["ImageScaleToTotalPixels"].inputs["megapixels"].low == 0.01
        assert NODES["KSampler"].inputs["seed"].high == 2**64 - 1


class TestOfficialTemplates:
    @pytest.mark.parametrize("name", [EDIT, PLUS_2509, EDIT_2511, INT8_2511, RELIGHT])
    def test_translated_with_turbo(self, name: str) -> None:
        workflow = tiny(template(name))
        if name == RELIGHT:  # its LoRA is a bare name from ComfyUI's loras folder: given as a URL here
            workflow["10:118"]["inputs"]["lora_name"] = "https://example.com/relight.safetensors"
        job = translate(workflow, VARIANT[name])
        if name == RELIGHT:
            assert job.input["loras"] == [{"path": "https://example.com/relight.safetensors", "scale": 1.0}]
            assert job.input["prompt"].startswith("重新照明, relight")  # StringConcatenate of a primitive
        assert job is not None
        raw = job.input
        assert (raw["num_inference_steps"], raw["true_cfg_scale"], raw["size"]) == (4, 1.0, "120*80")
        assert raw["seed"] == template(name)[nodes_of(workflow, "KSampler")[0]]["inputs"]["seed"]  # as sent
        pictures = raw.get("images") or [raw["image"]]
        assert len(pictures) == (2 if name == EDIT_2511 else 1)
        request = parse_request(raw, settings(VARIANT[name]).variant, ModelDefaults.for_model(
            settings(VARIANT[name]).variant, True))
        assert request.exact_size == (120, 80) and request.size == (128, 80)

    def test_2511_as_shipped_needs_a_base_model_worker(self) -> None:
        workflow = tiny(template(EDIT_2511), turbo=None)  # enable_turbo_mode false: 40 steps, cfg 4, no LoRA
        message = error_of(comfy_job(workflow)["input"])
        assert message.startswith("input.workflow.170:169.inputs.model: the model reaching this KSampler has no "
                                  "Lightning LoRA")
        job = comfy.workflow_job(comfy_job(workflow)["input"], settings(LIGHTNING="0"))
        assert job is not None and job.input["num_inference_steps"] == 40 and job.input["true_cfg_scale"] == 4.0
        assert job.input["negative_prompt"] == " "  # ComfyUI encodes its empty negative; diffusers needs one
        assert any("base-model scheduler" in w for w in job.warnings)

    def test_2511_as_exported_runs_its_own_seed(self) -> None:
        """Not even resized: the seed ComfyUI's template ships with (above 2**32) is the job's, no warning."""
        job = comfy.workflow_job(comfy_job(template(EDIT_2511))["input"], settings(LIGHTNING="0"))
        assert job is not None and job.input["seed"] == 677909188488042
        assert not any("seed" in w for w in job.warnings)

    def test_file_names_and_warnings(self) -> None:
        job = translate(tiny(template(PLUS_2509)), "edit-2509")
        assert job.filenames == [["Qwen_Image_2509_00001.png"]]  # SaveImageAdvanced: no trailing underscore
        assert job.input["seed"] == 362225868152841 and not any("seed" in w for w in job.warnings)  # run as sent
        assert translate(tiny(template(EDIT_2511)), "edit-2511").filenames == [["Qwen_Edit_2511_00001_.png"]]

    def test_full_size_is_comfyuis(self) -> None:
        """Unedited, the 2511 template works at FluxKontextImageScale's preferred size: 1248x832 for 3:2."""
        job = translate(tiny(template(EDIT_2511), megapixels=1.0) | {"170:160": template(EDIT_2511)["170:160"]})
        assert (job.input["width"], job.input["height"]) == (1248, 832)

    def test_inflation_lora_on_a_base_model_worker(self) -> None:
        workflow = tiny(template(INFLATION))
        workflow["89:90"]["inputs"]["lora_name"] = "someone/inflate/INFL8.safetensors"
        job = comfy.workflow_job(comfy_job(workflow)["input"], settings(LIGHTNING="0"))
        assert job is not None and job.input["loras"] == [{"path": "someone/inflate/INFL8.safetensors", "scale": 1.0}]


def without(workflow: dict[str, Any], node_id: str) -> dict[str, Any]:
    out = copy.deepcopy(workflow)
    del out[node_id]
    return out


def put(workflow: dict[str, Any], node_id: str, **inputs: Any) -> dict[str, Any]:
    out = copy.deepcopy(workflow)
    out[node_id]["inputs"].update(inputs)
    return out


W = tiny(template(EDIT_2511))
CASES: list[tuple[Any, str]] = [
    ({"workflow": put(W, "170:169", cfg="1")}, "input.workflow.170:169.inputs.cfg: must be a number (got '1')"),
    ({"workflow": W | {"99": {"class_type": "ImageUpscaleWithModel", "inputs": {}}}},
     "input.workflow.99.class_type: 'ImageUpscaleWithModel' is not a node this worker interprets"),
    ({"workflow": {"nodes": [], "links": [], "version": 0.4}},
     "input.workflow: this is ComfyUI's UI format (nodes and links); export the workflow with Workflow > Export (API)"),
    ({"workflow": without(W, "9")}, "input.workflow: has no output node"),
    ({"workflow": W | {"200": {"class_type": "SaveImage", "inputs": {"images": ["201", 0]}},
                       "201": {"class_type": "VAEDecode", "inputs": {"samples": ["202", 0], "vae": ["170:146", 0]}},
                       "202": copy.deepcopy(W["170:169"])}}, "input.workflow: holds 2 edits (KSampler 170:169, 202)"),
    ({"workflow": put(W, "170:169", steps=[["170:167"], 0])},
     "input.workflow.170:169.inputs.steps: must be a whole number (got [['170:167'], 0])"),
    ({"workflow": put(W, "170:169", latent_image=["41", 0])},
     "input.workflow.170:169.inputs.latent_image: needs a LATENT, and output 0 of LoadImage 41 is a IMAGE"),
    ({"workflow": put(W, "170:169", sampler_name="dpmpp_2m")},
     "input.workflow.170:169.inputs.sampler_name: this worker samples with euler and the simple scheduler"),
    ({"workflow": put(W, "170:169", denoise=0.6)}, "input.workflow.170:169.inputs.denoise: must be 1"),
    ({"workflow": put(W, "170:169", foo=1)}, "input.workflow.170:169.inputs.foo: KSampler has no input 'foo'"),
    ({"workflow": put(W, "170:161", unet_name="qwen_image_edit_2509_fp8_e4m3fn.safetensors")},
     "input.workflow.170:161.inputs.unet_name: 'qwen_image_edit_2509_fp8_e4m3fn.safetensors' is edit-2509's model; "
     "this worker serves Qwen/Qwen-Image-Edit-2511"),
    ({"workflow": put(W, "170:153", lora_name="Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors")},
     "input.workflow.170:153.inputs.lora_name: 'Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors' is not "
     "the Lightning LoRA this worker has: it runs Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors fused"),
    ({"workflow": put(W, "170:153", strength_model=0.5)}, "input.workflow.170:153.inputs.strength_model: must be 1"),
    ({"workflow": put(W, "170:162", type="flux")}, "input.workflow.170:162.inputs.type: must be qwen_image"),
    ({"workflow": W, "images": [{"name": "leather_sofa.png", "image": "data:image/png;base64,iVBOR!!"},
                                images_for(W)[1]]},
     "input.images[0]: not valid base64 image data"),
    ({"workflow": W, "images": [{"name": "texture_fur.png", "image": images_for(W)[1]["image"]}]},
     "input.workflow.41.inputs.image: 'leather_sofa.png' is not in input.images (names: 'texture_fur.png')"),
    ({"workflow": W, "images": ["abc"]},
     "input.images: 'images' must be a list of objects with 'name' and 'image' keys"),
    ({"workflow": W, "images": [*images_for(W), {"name": "leather_sofa.png", "image": "x"}]},
     "input.images[2].name: 'leather_sofa.png' is also input.images[0]'s; names must be unique"),
    ({"workflow": W, "images": images_for(W), "prompt": "p"}, "input.prompt: give either worker-comfyui's request"),
    ({"workflow": W, "images": images_for(W), "steps": 3}, "input: unknown field(s) steps; with input.workflow"),
    ({"prompt": "p", "images": [{"name": "a.png", "image": "x"}]},
     "input.images: a list of {name, image} objects is worker-comfyui's shape, which needs input.workflow"),
    ({"workflow": put(W, "9", filename_prefix="../../etc/x")},
     "input.workflow.9.inputs.filename_prefix: saving outside"),
    ({"workflow": put(W, "170:163", switch=True, on_true=None)},
     "input.workflow.170:163.inputs.on_true: must be a link"),
]


class TestCleanErrors:
    @pytest.mark.parametrize(("raw", "message"), CASES)
    def test_one_clean_error(self, raw: dict[str, Any], message: str) -> None:
        if "images" not in raw and "workflow" in raw:
            raw = {**raw, "images": images_for(raw["workflow"])}
        error = error_of(raw)
        assert message in error and error.startswith(message.split(":")[0] + ":"), error

    def test_bare_lora_name_without_lora_dir(self) -> None:
        workflow = tiny(template(RELIGHT))
        error = error_of(comfy_job(workflow)["input"], "edit-2509")
        assert error.startswith("input.workflow.10:118.inputs.lora_name: 'Qwen-Image-Edit-2509-Relight.safetensors' "
                                "is a file in ComfyUI's loras folder, which this worker does not have")
        job = comfy.workflow_job(comfy_job(workflow)["input"], settings("edit-2509", LORA_DIR="/nonexistent"))
        assert job is not None and job.input["loras"][0]["path"] == "Qwen-Image-Edit-2509-Relight.safetensors"

    def test_lightning_on_a_base_model_worker(self) -> None:
        error = error_of(comfy_job(tiny(template(PLUS_2509)))["input"], "edit-2509", LIGHTNING="0")
        assert error.startswith("input.workflow.433:89.inputs.lora_name: this worker runs the base model without the "
                                "Lightning LoRA (LIGHTNING=0)")

    def test_too_large_a_picture_names_the_node_that_sized_it(self) -> None:
        error = error_of(comfy_job(put(W, "170:160", megapixels=16.0))["input"])
        assert error.startswith("input.workflow.170:160.inputs.megapixels: the edit would be ")

    def test_errors_map_back_to_the_callers_fields(self) -> None:
        job = translate(W)
        renamed = job.rename(RequestError("input.images[1]", "not valid base64"))
        assert str(renamed) == "input.images[1]: not valid base64"
        steps = job.rename(RequestError("input.num_inference_steps", "x"))
        assert steps.subject == "input.workflow.170:169.inputs.steps"
        assert job.rename(RequestError("input.megapixels", "x")).subject == "input.workflow.170:160.inputs.megapixels"

    def test_comfy_org_api_key_is_refused_only_by_type(self) -> None:
        job = translate(W, comfy_org_api_key="secret-key")
        assert any(w.startswith("input.comfy_org_api_key: not used") for w in job.warnings)
        assert "secret-key" not in str(job.warnings) and "secret-key" not in str(job.input)
        assert error_of({**comfy_job(W)["input"], "comfy_org_api_key": 5}).startswith("input.comfy_org_api_key:")

    def test_input_as_json_text(self) -> None:
        import json

        assert comfy.workflow_job(json.dumps(comfy_job(W)["input"]), settings()) is not None
        assert comfy.workflow_job({"prompt": "p", "image": "x"}, settings()) is None  # this worker's own shape


def test_the_docs_example_means_what_the_docs_say() -> None:
    import json
    import re
    from pathlib import Path

    from conftest import b64_picture

    doc = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()  # for worker-comfyui
    body = json.loads(re.search(r"<!-- comfy-example -->\n```json\n(.*?)```", doc, re.S).group(1))  # type: ignore[union-attr]
    body["input"]["images"][0]["image"] = b64_picture(96, 64)  # a 3:2 picture
    job = comfy.workflow_job(body["input"], settings())
    assert job is not None
    assert {k: v for k, v in job.input.items() if k != "image"} == {
        "prompt": "make the sofa green velvet", "seed": 42, "num_inference_steps": 4, "true_cfg_scale": 1.0,
        "output_format": "png", "width": 1248, "height": 832}
    assert job.filenames == [["sofa_00001_.png"]]
    for warning in job.warnings:
        assert warning in doc
