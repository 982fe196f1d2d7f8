"""Request LoRAs without a model: the `input.loras` field, the safetensors header check, the disk
cache's bookkeeping and the precision decision (all pure, milliseconds)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from lora_files import lora_bytes
from qwen_edit_worker.errors import RequestError
from qwen_edit_worker.loras.cache import LoraCache
from qwen_edit_worker.loras.request import parse_loras, strip_query
from qwen_edit_worker.loras.safefile import SafetensorsProblem, check_file
from qwen_edit_worker.loras.support import adapter_problem, compile_problem
from qwen_edit_worker.schema import FIELDS, ModelDefaults, parse_request
from qwen_edit_worker.settings import Settings
from qwen_edit_worker.weights.precision import PRECISIONS
from qwen_edit_worker.weights.variants import VARIANTS

V = VARIANTS["edit-2511"]


def error_of(raw: object, max_loras: int = 3) -> str:
    with pytest.raises(RequestError) as caught:
        parse_loras(raw, max_loras)
    return str(caught.value)


class TestField:
    def test_in_the_schema_with_its_default(self) -> None:
        assert "loras" in FIELDS
        job = {"prompt": "p", "image": "aGk="}
        assert parse_request(job, V, ModelDefaults.for_model(V, True)).loras == ()
        request = parse_request({**job, "loras": [{"path": "a/b"}]}, V, ModelDefaults.for_model(V, True))
        assert request.loras[0].scale == 1.0 and request.loras[0].source.kind == "huggingface"

    def test_the_three_kinds_of_path(self) -> None:
        url, hub, local, rev = parse_loras([
            {"path": "https://example.com/x/style.safetensors?sig=secret", "scale": 0.5},
            {"path": "org/name/sub/file.safetensors", "scale": -4},
            {"path": "my-style", "scale": 4},
            {"path": "org/name@v1.0"},
        ], 4)
        assert (url.source.kind, url.scale, url.field) == ("url", 0.5, "input.loras[0]")
        assert (hub.source.repo, hub.source.revision, hub.source.filename) == ("org/name", "main",
                                                                             "sub/file.safetensors")
        assert (local.source.kind, local.source.filename) == ("local", "my-style.safetensors")
        assert (rev.source.revision, rev.source.filename) == ("v1.0", "")

    def test_a_huggingface_blob_link_is_read_as_its_resolve_link(self) -> None:
        (item,) = parse_loras([{"path": "https://huggingface.co/o/n/blob/main/a/b.safetensors"}], 3)
        assert item.source.url == "https://huggingface.co/o/n/resolve/main/a/b.safetensors"

    def test_shown_paths_lose_query_strings_and_credentials(self) -> None:
        assert strip_query("https://u:pw@h.example:8443/a.safetensors?X-Amz-Signature=s#f") == \
            "https://h.example:8443/a.safetensors"
        (item,) = parse_loras([{"path": "https://h.example/a.safetensors?token=s"}], 3)
        assert "token" not in item.shown_path and item.shown_path.endswith("a.safetensors")
        assert strip_query("org/name") == "org/name"

    @pytest.mark.parametrize(("raw", "subject", "words"), [
        ("x", "input.loras", "a list of 0 to 3"),
        ([{"path": "a"}] * 4, "input.loras", "MAX_LORAS"),
        (["a"], "input.loras[0]", "must be an object"),
        ([{"path": "a", "weight": 1}], "input.loras[0]", "unknown field(s) weight"),
        ([{"path": "a"}, {"scale": 1}], "input.loras[1].path", "required"),
        ([{"path": "a", "scale": 4.5}], "input.loras[0].scale", "from -4 to 4"),
        ([{"path": "a", "scale": True}], "input.loras[0].scale", "from -4 to 4"),
        ([{"path": "a", "scale": "1"}], "input.loras[0].scale", "from -4 to 4"),
        ([{"path": "ftp://h/a.safetensors"}], "input.loras[0].path", "only http and https"),
        ([{"path": "file:///etc/passwd"}], "input.loras[0].path", "only http and https"),
        ([{"path": "../secret"}], "input.loras[0].path", "leaves LORA_DIR"),
        ([{"path": "/etc/passwd"}], "input.loras[0].path", "leaves LORA_DIR"),
        ([{"path": "sub\\..\\x"}], "input.loras[0].path", "leaves LORA_DIR"),
        ([{"path": "o/n/../../x.safetensors"}], "input.loras[0].path", "leaves LORA_DIR"),
        ([{"path": "o/n/model.bin"}], "input.loras[0].path", ".safetensors path"),
        ([{"path": "o/n@bad rev"}], "input.loras[0].path", "revision"),
        ([{"path": "bad name!"}], "input.loras[0].path", "a LORA_DIR name"),
    ])
    def test_bad_items_name_the_item(self, raw: object, subject: str, words: str) -> None:
        message = error_of(raw)
        assert message.startswith(f"{subject}: ") and words in message

    def test_max_loras_zero_turns_the_field_off(self) -> None:
        assert parse_loras([], 0) == ()
        assert "0 to 0" in error_of([{"path": "a"}], 0)


class TestSafetensorsCheck:
    def test_a_real_lora_passes_and_its_layers_are_counted(self, tmp_path: Path) -> None:
        path = tmp_path / "a.safetensors"
        path.write_bytes(lora_bytes(1))
        assert check_file(path).lora_layers == 28

    @pytest.mark.parametrize(("make", "words"), [
        (lambda good: pickle.dumps({"a": 1}), "never loads"),
        (lambda good: b"PK\x03\x04" + good[:100], "never loads"),
        (lambda good: b"abc", "too short"),
        (lambda good: good[: len(good) // 2], "cut off"),
        (lambda good: good[:20], "cut off"),
        (lambda good: struct.pack("<Q", 5) + b"nope!", "not JSON"),
        (lambda good: _with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 16), "malformed"),
        (lambda good: _with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8), "cut off"),
        (lambda good: _with_header({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, 1), "malformed"),
        (lambda good: _with_header({}, 0), "no tensors"),
    ])
    def test_bad_files_are_named_before_anything_loads_them(self, tmp_path: Path, make: object, words: str) -> None:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(make(lora_bytes(1)))  # type: ignore[operator]
        with pytest.raises(SafetensorsProblem, match=words):
            check_file(path)


def _with_header(table: dict[str, object], data: int) -> bytes:
    raw = json.dumps(table).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data


class TestCache:
    def _add(self, cache: LoraCache, key: str, size: int, sha: str) -> Path:
        partial = cache.new_partial()
        partial.write_bytes(b"x" * size)
        path = cache.add(key, partial, sha)
        cache.release(sha)
        return path

    def test_least_recently_used_out_past_the_limit_and_the_index_survives(self, tmp_path: Path) -> None:
        cache = LoraCache(tmp_path, max_bytes=250)
        self._add(cache, "url:a", 100, "a" * 64)
        self._add(cache, "url:b", 100, "b" * 64)
        assert cache.lookup("url:a") is not None  # a is now the more recent
        cache.release("a" * 64)
        self._add(cache, "url:c", 100, "c" * 64)
        assert cache.lookup("url:b") is None and cache.total_bytes() == 200
        assert not (tmp_path / "blobs" / f"{'b' * 64}.safetensors").exists()
        again = LoraCache(tmp_path, max_bytes=250)
        assert again.lookup("url:c") is not None and again.lookup("url:a") is not None

    def test_a_held_file_is_not_evicted(self, tmp_path: Path) -> None:
        cache = LoraCache(tmp_path, max_bytes=150)
        self._add(cache, "url:a", 100, "a" * 64)
        assert cache.lookup("url:a") is not None  # held by a job in progress
        self._add(cache, "url:b", 100, "b" * 64)
        assert cache.lookup("url:a") is not None

    def test_the_index_holds_no_url_and_partials_do_not_survive(self, tmp_path: Path) -> None:
        cache = LoraCache(tmp_path, max_bytes=1000)
        self._add(cache, "url:https://h.example/a.safetensors?sig=SECRET", 10, "a" * 64)
        leftover = cache.new_partial()
        assert "SECRET" not in (tmp_path / "index.json").read_text()
        LoraCache(tmp_path, max_bytes=1000)
        assert not leftover.exists()


class TestPrecision:
    def test_every_precision_the_worker_runs_takes_adapters(self) -> None:
        assert all(adapter_problem(p) is None for p in PRECISIONS)

    def test_another_precision_is_an_error_naming_precision(self) -> None:
        problem = adapter_problem("int4")
        assert problem is not None and "PRECISION" in problem and "int4" in problem


    def test_compiled_blocks_take_loras_unless_lora_max_rank_is_zero(self) -> None:
        assert compile_problem("off", 0) is None and compile_problem("regional", 32) is None
        problem = compile_problem("regional", 0)
        assert problem is not None and "LORA_MAX_RANK" in problem and "COMPILE=regional" in problem


class TestSettings:
    def test_defaults_and_bounds(self, tmp_path: Path) -> None:
        s = Settings.from_env({})
        assert (s.max_loras, s.lora_max_bytes, s.lora_cache_bytes, s.lora_slots) == (3, 2_000_000_000,
                                                                                   20_000_000_000, 4)
        assert s.hf_endpoint == "https://huggingface.co" and s.summary()["hf_token"] == "(empty)"
        assert Settings.from_env({"HF_TOKEN": "hf_x"}).summary()["hf_token"] == "(set)"
        assert Settings.from_env({"LORA_DIR": str(tmp_path)}).lora_dir == tmp_path
        for name, bad in (("MAX_LORAS", "9"), ("LORA_SLOTS", "0"), ("LORA_CACHE_GB", "-1"),
                          ("LORA_MAX_BYTES", "0"), ("HF_ENDPOINT", "ftp://x")):
            with pytest.raises(Exception, match=f"^{name}: "):
                Settings.from_env({name: bad})
