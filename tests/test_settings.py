"""Settings: defaults, parsing, and errors that name the setting and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_edit_worker.errors import SettingsError
from qwen_edit_worker.model.sources import resolve
from qwen_edit_worker.settings import SETTINGS, Settings, front_door


class TestDefaults:
    def test_empty_environment(self) -> None:
        s = Settings.from_env({})
        assert s.variant.name == "edit-2511"
        assert s.model_path == Path("/models/edit-2511")
        assert s.lora_path is None
        assert resolve(s.model_path).default_lora(s.variant) == Path(
            "/models/edit-2511/lightning/Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors")
        assert (s.lightning, s.tiny_model, s.warmup) == (True, False, True)
        assert (s.attention_backend, s.memory_saving, s.log_level) == ("auto", "auto", "INFO")
        assert s.gpu_price_per_second is None
        assert (s.max_input_bytes, s.max_input_pixels) == (20_000_000, 40_000_000)
        assert s.concurrency == 2

    def test_model_path_follows_variant(self) -> None:
        assert Settings.from_env({"MODEL_VARIANT": "edit-2509"}).model_path == Path("/models/edit-2509")
        edit = Settings.from_env({"MODEL_VARIANT": "edit", "MODEL_PATH": "/v/m"})
        assert resolve(edit.model_path).default_lora(edit.variant) == Path(
            "/v/m/lightning/Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors")

    def test_blank_values_mean_default(self) -> None:
        assert Settings.from_env({"MODEL_VARIANT": " ", "GPU_PRICE_PER_SECOND": ""}).variant.name == "edit-2511"

    def test_every_field_is_a_documented_setting(self) -> None:
        assert len(SETTINGS) == len(Settings.__dataclass_fields__)


class TestParsing:
    @pytest.mark.parametrize(("raw", "expected"), [("1", True), ("TRUE", True), ("on", True), ("0", False),
                                                   ("no", False), ("off", False)])
    def test_flags(self, raw: str, expected: bool) -> None:
        assert Settings.from_env({"LIGHTNING": raw}).lightning is expected

    def test_values(self) -> None:
        s = Settings.from_env({"ATTENTION_BACKEND": "XFormers", "MEMORY_SAVING": "on", "LORA_PATH": "/l.safetensors",
                               "GPU_PRICE_PER_SECOND": "0.00116", "LOG_LEVEL": "debug", "CONCURRENCY": " 1 "})
        assert s.concurrency == 1
        assert (s.attention_backend, s.memory_saving, s.log_level) == ("xformers", "on", "DEBUG")
        assert s.lora_path == Path("/l.safetensors") and s.gpu_price_per_second == 0.00116

    def test_gpu_prices(self) -> None:
        """GPU_PRICES is what `qwen-edit deploy` writes from RunPod's catalog: the catalog's GPU type ids -> USD/s."""
        s = Settings.from_env({"GPU_PRICES": '{"NVIDIA GeForce RTX 4090": 0.00030556, " NVIDIA L4 ": 1.9e-4}'})
        assert s.gpu_prices == {"NVIDIA GeForce RTX 4090": 0.00030556, "NVIDIA L4": 0.00019}
        assert Settings.from_env({}).gpu_prices == {} == Settings.from_env({"GPU_PRICES": "{}"}).gpu_prices
        assert Settings.from_env({"GPU_PRICES": " "}).gpu_prices == {}


class TestErrors:
    @pytest.mark.parametrize(("name", "value", "allowed"), [
        ("MODEL_VARIANT", "edit-2512", "edit, edit-2509, edit-2511"),
        ("ATTENTION_BACKEND", "sage", "auto, native, xformers, flash, _native_cudnn, _native_flash, _native_efficient"),
        ("MEMORY_SAVING", "maybe", "auto, on, off"),
        ("LIGHTNING", "2", "must be 1 or 0"),
        ("WARMUP", "yes please", "must be 1 or 0"),
        ("GPU_PRICE_PER_SECOND", "cheap", "above 0 and below 1"),
        ("GPU_PRICE_PER_SECOND", "-0.1", "above 0 and below 1"),
        ("GPU_PRICES", "{not json", "JSON object of GPU type name -> USD per second"),
        ("GPU_PRICES", '["NVIDIA L4", 0.0002]', "JSON object of GPU type name -> USD per second"),
        ("GPU_PRICES", '{"NVIDIA L4": "0.0002"}', "JSON object of GPU type name -> USD per second"),
        ("GPU_PRICES", '{"NVIDIA L4": 0.69}', "price per hour / 3600"),  # per hour, not per second
        ("GPU_PRICES", '{"NVIDIA L4": 0}', "above 0, below 0.1"),
        ("GPU_PRICES", '{"NVIDIA L4": true}', "JSON object of GPU type name -> USD per second"),
        ("GPU_PRICES", '{" ": 0.0002}', "JSON object of GPU type name -> USD per second"),
        ("MAX_INPUT_BYTES", "0", "positive whole number"),
        ("LOG_LEVEL", "loud", "DEBUG, INFO, WARNING, ERROR"),
        ("CONCURRENCY", "0", "whole number from 1 to 4"),
        ("CONCURRENCY", "5", "whole number from 1 to 4"),
        ("CONCURRENCY", "two", "whole number from 1 to 4"),
    ])
    def test_bad_value_names_setting(self, name: str, value: str, allowed: str) -> None:
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({name: value})
        assert caught.value.subject == name
        assert str(caught.value).startswith(f"{name}: ") and allowed in str(caught.value)


class TestModelSources:
    """MODEL_PATH may be a baked folder, RunPod's Hugging Face cache, or any folder."""

    def _cache_repo(self, hub: Path, repo: str, commit: str, files: tuple[str, ...] = ()) -> Path:
        folder = hub / ("models--" + repo.replace("/", "--"))
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
        for name in files:
            (folder / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / commit / name).write_bytes(b"x")
        return folder

    def test_huggingface_cache_repo_folder(self, tmp_path: Path) -> None:
        from qwen_edit_worker.weights.variants import VARIANTS

        variant = VARIANTS["edit-2511"]
        repo = self._cache_repo(tmp_path, variant.repo, "a" * 40)
        self._cache_repo(tmp_path, variant.lora_repo, "b" * 40, (variant.lora_file,))
        source = resolve(repo)
        assert source.kind == "huggingface-cache" and source.path == repo / "snapshots" / ("a" * 40)
        assert source.manifest() == {"model": f"{variant.repo}@{'a' * 12}"}
        assert source.default_lora(variant) == tmp_path / (
            "models--" + variant.lora_repo.replace("/", "--")) / "snapshots" / ("b" * 40) / variant.lora_file

    def test_baked_manifest_and_plain_folder(self, tmp_path: Path) -> None:
        import json

        (tmp_path / "manifest.json").write_text(json.dumps(
            {"model": {"repo": "Qwen/X", "commit": "c" * 40}, "lora": {"repo": "l/Y", "commit": "d" * 40}}))
        assert resolve(tmp_path).manifest() == {"model": f"Qwen/X@{'c' * 12}", "lora": f"l/Y@{'d' * 12}"}
        (tmp_path / "manifest.json").write_text("{broken")
        assert resolve(tmp_path).kind == "folder" and resolve(tmp_path).manifest() is None


class TestEndpointType:
    def test_lb_settings_and_their_defaults(self) -> None:
        s = Settings.from_env({})
        assert (s.endpoint_type, s.port, s.port_health, s.lb_max_waiting, s.api_key) == ("queue", 80, 80, 2, "")
        s = Settings.from_env({"ENDPOINT_TYPE": "LB", "PORT": "8000", "API_KEY": "k-secret"})
        assert (s.endpoint_type, s.port, s.port_health) == ("lb", 8000, 8000)  # PORT_HEALTH follows PORT
        assert Settings.from_env({"PORT": "8000", "PORT_HEALTH": "8001"}).port_health == 8001
        assert "k-secret" not in repr(s) and s.summary()["api_key"] == "(set)"

    @pytest.mark.parametrize(("name", "value"), [("ENDPOINT_TYPE", "serverless"), ("PORT", "0"),
                                                 ("PORT_HEALTH", "70000"), ("LB_MAX_WAITING", "17")])
    def test_bad_values_name_the_setting(self, name: str, value: str) -> None:
        with pytest.raises(SettingsError, match=f"^{name}: "):
            Settings.from_env({name: value})

    @pytest.mark.parametrize(("value", "queue_present", "door"), [
        ("", True, "queue"), ("", False, "queue"), ("lb", True, "lb"), (" LB ", False, "lb"),
        ("balancer", True, "queue"), ("balancer", False, "lb")])
    def test_front_door(self, value: str, queue_present: bool, door: str) -> None:
        """A bad value serves where the worker can say so: the queue's jobs, or the HTTP server's /ping."""
        assert front_door({"ENDPOINT_TYPE": value}, queue_present) == door
