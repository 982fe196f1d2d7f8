"""Request LoRAs through the real worker on the tiny model (real diffusers and peft): they change
the picture, repeat exactly, never leak into the next job, load in every key style, fail cleanly,
and are fetched outside the GPU section."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save

from conftest import decode_output_image, small_job, tiny_env
from hub_server import Hub, Repo
from lora_files import STYLES, FileServer, Route, lora_bytes, lora_state, write_lora
from qwen_edit_worker.serving.worker import Worker


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("loras")
    write_lora(root / "dir" / "local-style.safetensors", seed=30)
    for style in STYLES:
        write_lora(root / "dir" / f"{style}.safetensors", seed=31, style=style)
    unmatched = {"some_other_model.layers.0.lora_A.weight": torch.ones(2, 8),
                 "some_other_model.layers.0.lora_B.weight": torch.ones(8, 2)}
    wrong_shape = {k: torch.ones(v.shape[0] + 1, *v.shape[1:]) for k, v in lora_state(32).items()}
    routes = {"/one.safetensors": Route(lora_bytes(10)), "/two.safetensors": Route(lora_bytes(11)),
              "/unmatched.safetensors": Route(save(unmatched)), "/wrong.safetensors": Route(save(wrong_shape)),
              "/pickle.pt": Route(b"\x80\x04\x95" + b"x" * 64), "/new.safetensors": Route(lora_bytes(12), delay_s=0.4)}
    repos = {"org/style": Repo({"style.safetensors": lora_bytes(13)})}
    with FileServer(routes) as server, Hub(repos) as hub:
        env = tiny_env(ALLOW_LOOPBACK_URLS="1", LORA_DIR=str(root / "dir"), LORA_CACHE_DIR=str(root / "cache"),
                       HF_ENDPOINT=hub.url, LORA_SLOTS="3")
        yield {"env": env, "server": server, "url": server.url, "worker": Worker(env), "root": root}


def pixels(result: dict[str, Any]) -> np.ndarray:
    assert "error" not in result, result
    return decode_output_image(result["images"][0])


def job(*loras: dict[str, Any]) -> dict[str, Any]:
    return small_job(loras=list(loras))


class TestApplied:
    def test_url_repo_and_local_loras_change_the_picture_and_leave_nothing_behind(self, place: dict) -> None:
        worker, url = place["worker"], place["url"]
        before = pixels(worker.handle(small_job()))
        outputs = {}
        for path in (f"{url}/one.safetensors?X-Signature=SECRET", "org/style", "local-style"):
            result = worker.handle(job({"path": path, "scale": 1.0}))
            outputs[path] = pixels(result)
            (applied,) = result["model"]["loras"]
            assert applied["layers"] == 28 and len(applied["sha256"]) == 12 and "SECRET" not in applied["path"]
            assert result["timing"]["lora_ms"] > 0
            assert not np.array_equal(outputs[path], before)
        assert len({o.tobytes() for o in outputs.values()}) == 3  # three different LoRAs, three pictures
        after = worker.handle(small_job())
        assert np.array_equal(pixels(after), before)  # exactly: no adapter stays active
        assert after["timing"]["lora_ms"] == 0 and after["model"]["loras"] == []

    def test_the_same_lora_twice_gives_the_same_pixels_the_second_time_cached(self, place: dict) -> None:
        worker, url = place["worker"], place["url"]
        first = worker.handle(job({"path": f"{url}/two.safetensors", "scale": 0.7}))
        second = worker.handle(job({"path": f"{url}/two.safetensors", "scale": 0.7}))
        assert np.array_equal(pixels(first), pixels(second))
        assert (first["model"]["loras"][0]["cached"], second["model"]["loras"][0]["cached"]) == (False, True)
        assert place["server"].hits["/two.safetensors"] == 1
        assert first["model"]["loras"][0]["source"] == "url"

    def test_two_loras_at_once_and_scales_matter(self, place: dict) -> None:
        worker, url = place["worker"], place["url"]
        one, two = {"path": f"{url}/one.safetensors"}, {"path": f"{url}/two.safetensors"}
        both = pixels(worker.handle(job(one, two)))
        assert not np.array_equal(both, pixels(worker.handle(job(one))))
        assert not np.array_equal(both, pixels(worker.handle(job(two))))
        half = pixels(worker.handle(job({**one, "scale": 0.5})))
        assert not np.array_equal(half, pixels(worker.handle(job(one))))
        negative = worker.handle(job({**one, "scale": -1.5}, two))
        assert [item["scale"] for item in negative["model"]["loras"]] == [-1.5, 1.0]

    def test_every_key_style_loads_the_same_lora(self, place: dict) -> None:
        worker = place["worker"]
        results = [worker.handle(job({"path": style})) for style in STYLES]
        assert all(r["model"]["loras"][0]["layers"] == 28 for r in results)
        reference = pixels(results[0]).astype(int)
        for result in results[1:]:  # Kohya and ComfyUI names converted by diffusers land on the same layers
            assert np.abs(pixels(result).astype(int) - reference).max() <= 1

    def test_slots_keep_recent_loras_loaded_and_evict_the_oldest(self, place: dict) -> None:
        worker, url = place["worker"], place["url"]
        worker.handle(job({"path": f"{url}/one.safetensors"}))
        slots = worker.loras.slots(worker.model.get()[0].model.pipe)
        loads = slots.loads
        worker.handle(job({"path": f"{url}/one.safetensors"}))
        assert slots.loads == loads  # still loaded: no load
        for name in ("local-style", "org/style", "peft", "kohya"):
            worker.handle(job({"path": name}))
        assert len(slots.loaded) == 3 and slots.loads > loads
        per_adapter = worker.loras.loaded_bytes() / 3
        assert per_adapter == pytest.approx(sum(v.numel() * 4 for k, v in lora_state(0).items()), rel=0.01)
        adapters = slots.pipe.get_list_adapters()["transformer"]
        assert len(adapters) == 3  # evicted adapters are deleted from the model, not just forgotten


class TestFailures:
    @pytest.mark.parametrize(("path", "subject", "words"), [
        ("/unmatched.safetensors", "input.loras[0].path", "match no layer"),
        ("/wrong.safetensors", "input.loras[0].path", "does not fit this model"),
        ("/pickle.pt", "input.loras[0].path", "never loads"),
        ("/missing.safetensors", "input.loras[0].path", "HTTP 404"),
    ])
    def test_bad_loras_are_clean_errors_and_the_next_job_is_fine(self, place: dict, path: str, subject: str,
                                                                  words: str) -> None:
        worker = place["worker"]
        before = pixels(worker.handle(small_job()))
        result = worker.handle(job({"path": place["url"] + path}))
        assert result["error"].startswith(f"{subject}: ") and words in result["error"], result
        assert "Traceback" not in result["error"]
        assert np.array_equal(pixels(worker.handle(small_job())), before)
        assert worker.handle(job({"path": "local-style"}))["model"]["loras"][0]["layers"] == 28

    def test_compile_regional_without_slots_refuses_loras_before_fetching_or_loading(self, place: dict) -> None:
        worker = Worker({**place["env"], "COMPILE": "regional", "LORA_MAX_RANK": "0"})  # WARMUP=0: nothing loads
        result = worker.handle(job({"path": f"{place['url']}/never.safetensors"}))
        assert result["error"].startswith("input.loras: request LoRAs on a COMPILE=regional worker need LORA_MAX_RANK")
        assert place["server"].hits["/never.safetensors"] == 0 and not worker.model.ready

    def test_more_different_loras_than_slots_is_an_error_naming_lora_slots(self, place: dict) -> None:
        worker = Worker({**place["env"], "LORA_SLOTS": "1", "LORA_CACHE_DIR": str(place["root"] / "c1")})
        result = worker.handle(job({"path": "local-style"}, {"path": "peft"}))
        assert result["error"] == "input.loras: 2 different LoRAs, more than this worker keeps loaded (LORA_SLOTS=1)"
        assert worker.handle(job({"path": "local-style"}, {"path": "local-style", "scale": 0.5}))["model"]["loras"]

    def test_an_unusable_cache_dir_is_an_error_naming_it(self, place: dict) -> None:
        blocker = place["root"] / "a-file"
        blocker.write_text("not a folder")
        worker = Worker({**place["env"], "LORA_CACHE_DIR": str(blocker / "cache")})
        result = worker.handle(job({"path": f"{place['url']}/one.safetensors"}))
        assert result["error"].startswith("LORA_CACHE_DIR: cannot use ") and not worker.model.ready

    def test_the_second_item_is_named(self, place: dict) -> None:
        result = place["worker"].handle(job({"path": "local-style"}, {"path": "nope"}))
        assert result["error"].startswith("input.loras[1].path: no nope.safetensors in LORA_DIR")


class TestLogs:
    def test_the_job_line_has_the_count_and_sha256s_never_the_query(self, place: dict,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.INFO, logger="qwen_edit_worker"):
            result = place["worker"].handle(job({"path": f"{place['url']}/one.safetensors?sig=SECRET123"}))
        line = next(r.getMessage() for r in caplog.records if " done: " in r.getMessage())
        assert f"loras 1 {result['model']['loras'][0]['sha256']}" in line
        assert "SECRET123" not in caplog.text and "one.safetensors" not in line


class TestConcurrency:
    def test_the_next_jobs_lora_downloads_while_one_is_on_the_gpu_and_once_for_two(self, place: dict) -> None:
        steps: list[float] = []
        env = {**place["env"], "CONCURRENCY": "2", "LORA_CACHE_DIR": str(place["root"] / "cache2")}
        worker = Worker(env, progress=lambda job, progress: (steps.append(time.perf_counter()), time.sleep(0.3)))
        worker.handle(small_job())  # loaded
        steps.clear()
        server, hits = place["server"], []
        original = server.routes["/new.safetensors"]
        results: dict[str, dict[str, Any]] = {}

        def run(name: str, payload: dict[str, Any]) -> None:
            results[name] = worker.handle(payload)

        on_gpu = threading.Thread(target=run, args=("a", small_job()))
        on_gpu.start()
        while not steps:
            time.sleep(0.01)
        pair = [threading.Thread(target=run, args=(n, job({"path": f"{place['url']}/new.safetensors"})))
                for n in ("b", "c")]
        for thread in pair:
            thread.start()
        for thread in (on_gpu, *pair):
            thread.join(60)
        hits.append(server.hits["/new.safetensors"])
        assert original.delay_s > 0 and hits == [1]  # two jobs, one download
        assert worker.loras.fetcher.downloads == 1
        b, c = results["b"], results["c"]
        assert b["model"]["loras"][0]["sha256"] == c["model"]["loras"][0]["sha256"]
        # The download started while job a was still on the GPU (its third step had not begun): it
        # belongs to the job's input stage, not to the GPU section.
        assert server.hit_at["/new.safetensors"][0] < steps[2]
        assert min(b["timing"]["lora_ms"], c["timing"]["lora_ms"]) >= 300  # both waited for the one download


class TestCompiled:
    def test_regional_compile_hot_swaps_loras_without_recompiling(self, place: dict) -> None:
        """The one compile test (slow: two warm-ups).  Before: every new LoRA or scale recompiled, and
        after 8 torch.compile refused the block and the job failed."""
        from torch._dynamo.utils import counters

        root = place["root"]
        write_lora(root / "dir" / "rank8.safetensors", seed=40, rank=8)
        env = {**place["env"], "COMPILE": "regional", "LORA_MAX_RANK": "4", "LORA_SLOTS": "2",
               "LORA_CACHE_DIR": str(root / "compiled")}
        worker = Worker(env)
        before = pixels(worker.handle(small_job()))
        graphs = counters["stats"]["unique_graphs"]
        url = place["url"]
        results = [worker.handle(job(*loras)) for loras in (
            [{"path": f"{url}/one.safetensors"}], [{"path": "kohya", "scale": 0.5}],
            [{"path": f"{url}/one.safetensors", "scale": -1.0}], [{"path": "local-style"}, {"path": "comfyui"}],
            [{"path": f"{url}/two.safetensors"}], [{"path": f"{url}/one.safetensors"}])]
        after = worker.handle(small_job())
        assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled after load
        pictures = [pixels(r) for r in results]
        assert len({p.tobytes() for p in pictures}) == 5 and not any(np.array_equal(p, before) for p in pictures)
        assert np.array_equal(pixels(after), before)  # exactly: adapters off again
        plain = place["worker"].handle(job({"path": f"{url}/one.safetensors"}))
        assert np.abs(pictures[0].astype(int) - pixels(plain).astype(int)).max() <= 2  # same LoRA, compiled
        assert all(r["model"]["loras"][0]["layers"] == 28 for r in results)
        too_big = worker.handle(job({"path": "rank8"}))
        assert too_big["error"].startswith("input.loras[0].path: the LoRA's rank is 8, above LORA_MAX_RANK=4")
        assert np.array_equal(pixels(worker.handle(small_job())), before)


class TestPrecisions:
    def test_int8_takes_loras_and_forgets_them(self, place: dict) -> None:
        worker = Worker({**place["env"], "PRECISION": "int8", "LORA_CACHE_DIR": str(place["root"] / "c8")})
        before = pixels(worker.handle(small_job()))
        with_lora = worker.handle(job({"path": "local-style"}))
        assert with_lora["model"]["precision"] == "int8" and with_lora["model"]["loras"][0]["layers"] == 28
        assert not np.array_equal(pixels(with_lora), before)
        assert np.array_equal(pixels(worker.handle(small_job())), before)

    def test_fp8_layers_take_a_peft_adapter(self) -> None:
        """fp8 cannot be made by the loader on a CPU, but torchao's Float8Tensor can: peft wraps it."""
        from peft import LoraConfig, inject_adapter_in_model
        from torchao.quantization import Float8Tensor, PerRow

        torch.manual_seed(0)
        layer = torch.nn.Linear(16, 32, bias=False).to(torch.bfloat16)
        weight = Float8Tensor.from_hp(layer.weight.detach(), float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        x = torch.randn(3, 16, dtype=torch.bfloat16)
        base = layer(x)
        model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], init_lora_weights=False),
                                        torch.nn.Sequential(layer))
        assert type(model[0]).__name__ == "TorchaoLoraLinear"
        assert not torch.equal(model(x), base)
        model[0].enable_adapters(False)
        assert torch.equal(model(x), base)



class TestAdapterMemory:
    def test_the_jobs_sizing_gets_the_adapters_left_loaded_plus_the_jobs_new_files(
            self, place: dict, monkeypatch: pytest.MonkeyPatch) -> None:
        """Adapters sit on the GPU beside the weights: the job's sizing (placement.fit_request) is told their bytes."""
        from qwen_edit_worker import placement
        from qwen_edit_worker.serving import worker as serving

        worker, url = place["worker"], place["url"]
        worker.handle(job({"path": f"{url}/one.safetensors"}))
        resident = worker.loras.gpu_bytes([])
        assert resident > 0  # the adapter left loaded after the job, as measured on the GPU thread
        told: list[int] = []
        real = placement.fit_request

        def spy(*args: Any, **kwargs: Any) -> Any:
            told.append(args[5] if len(args) > 5 else kwargs.get("adapter_bytes", 0))
            return real(*args, **kwargs)

        monkeypatch.setattr(serving.placement, "fit_request", spy)
        worker.handle(small_job())
        worker.handle(job({"path": f"{url}/one.safetensors"}))  # loaded already: nothing new
        fresh = worker.handle(job({"path": f"{url}/two.safetensors"}))
        assert "error" not in fresh
        new_file = len(lora_bytes(11))
        assert told[:2] == [0, resident] and told[2] == resident + new_file, (told, resident, new_file)
