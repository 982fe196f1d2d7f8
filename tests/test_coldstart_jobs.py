"""A job that comes while the model loads: its prompt is encoded as soon as the text stage is in, while the
transformer is still being read, and its pixels are those of a job that waited (serving/early_text.py).

The load is held between its text stage and its transformer (model/sequence.py's transformer_stage waits for
the test), so the order is the test's, not the machine's speed.  What broke before: the SDK's job loop took no
job before the whole model was ready (a fitness check waited for it), and the text phase waited for the
transformer it does not use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import decode_output_image, small_job, tiny_env
from qwen_edit_worker.errors import ModelLoadError
from qwen_edit_worker.model import sequence
from qwen_edit_worker.serving.worker import Worker


class Gate:
    """Holds the load after its text stage until `open()`; counts the text encoder's calls meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: Exception | None = None) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()
        self.encoder_calls_before_transformer: int | None = None
        self.calls = 0
        original = sequence.transformer_stage

        def gated(how: Any, pipe: Any) -> Any:
            forward = pipe.text_encoder.forward

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls += 1
                return forward(*args, **kwargs)

            pipe.text_encoder.forward = counted
            self.reached.set()
            assert self.opened.wait(120), "the test never opened the gate"
            self.encoder_calls_before_transformer = self.calls
            if fail is not None:
                raise fail
            return original(how, pipe)

        monkeypatch.setattr(sequence, "transformer_stage", gated)

    def open(self) -> None:
        self.opened.set()


def run_in_thread(worker: Worker, job: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.update(worker.handle(job)))
    thread.start()
    return thread, answer


def wait_until(predicate: Any, seconds: float = 60) -> None:
    done = threading.Event()
    for _ in range(int(seconds * 20)):
        if predicate():
            return
        done.wait(0.05)
    raise AssertionError("the condition never held")


@pytest.fixture
def warm() -> Iterator[Worker]:
    yield Worker(tiny_env())


JOBS = {
    "one picture": {},
    "cfg with a negative prompt": {"true_cfg_scale": 2.0, "negative_prompt": "blurry"},
}


class TestEarlyText:
    @pytest.mark.parametrize("case", list(JOBS))
    def test_the_prompt_is_encoded_before_the_transformer_and_the_pixels_are_the_waiting_jobs(
            self, case: str, monkeypatch: pytest.MonkeyPatch, warm: Worker) -> None:
        job = small_job(seed=3, **JOBS[case])
        expected = warm.handle(job)
        gate = Gate(monkeypatch)
        worker = Worker(tiny_env(WARMUP="1"))
        worker.start()
        assert gate.reached.wait(120)
        thread, answer = run_in_thread(worker, job)
        wanted = 2 if "negative_prompt" in JOBS[case] else 1
        wait_until(lambda: gate.calls >= wanted)  # encoded while the transformer is held back
        gate.open()
        thread.join(240)
        assert "error" not in answer, answer
        assert gate.encoder_calls_before_transformer == wanted
        assert gate.calls == wanted  # the pipeline's call used those encodings: the encoder ran no more
        assert (decode_output_image(answer["images"][0]) == decode_output_image(expected["images"][0])).all()
        timing = answer["timing"]
        assert timing["cold_start"] is True and timing["load_ms"] > 0 and timing["text_encode_ms"] > 0

    def test_the_edit_variant_and_several_pictures_too(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from conftest import b64_picture

        for variant, fields in (("edit", {}), ("edit-2509", {"image": None,
                                                             "images": [b64_picture(seed=1), b64_picture(seed=2)]})):
            job = small_job(seed=4, **fields)
            expected = Worker(tiny_env(MODEL_VARIANT=variant)).handle(job)
            gate = Gate(monkeypatch)
            worker = Worker(tiny_env(WARMUP="1", MODEL_VARIANT=variant))
            worker.start()
            assert gate.reached.wait(120)
            thread, answer = run_in_thread(worker, job)
            wait_until(lambda gate=gate: gate.calls >= 1)
            gate.open()
            thread.join(240)
            assert "error" not in answer, (variant, answer)
            assert (decode_output_image(answer["images"][0]) == decode_output_image(expected["images"][0])).all()

    def test_a_load_that_fails_after_the_text_stage_answers_the_waiting_job_with_its_error(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        gate = Gate(monkeypatch, fail=ModelLoadError("LORA_PATH", "/models/x.safetensors is not a LoRA (simulated)"))
        worker = Worker(tiny_env(WARMUP="1"))
        worker.start()
        assert gate.reached.wait(120)
        thread, answer = run_in_thread(worker, small_job())
        wait_until(lambda: gate.calls >= 1)
        gate.open()
        thread.join(120)
        assert answer == {"error": "LORA_PATH: /models/x.safetensors is not a LoRA (simulated)"}
        assert worker.handle(small_job()) == answer  # and every job after it

    def test_a_job_after_the_load_encodes_as_usual(self, warm: Worker) -> None:
        first, second = warm.handle(small_job()), warm.handle(small_job())  # WARMUP=0: the first one loads
        assert first["timing"]["cold_start"] is True and first["timing"]["load_ms"] > 0
        assert second["timing"]["cold_start"] is False and second["timing"]["load_ms"] == 0
        assert second["timing"]["text_encode_ms"] > 0


class TestPlacementsThatWait:
    def test_model_and_group_offload_publish_no_text_stage(self) -> None:
        """Their hooks cover the whole pipeline at once: the text stage is not placed early there."""
        from qwen_edit_worker.model.choices import LoadPlan

        fields = {f: None for f in LoadPlan.__dataclass_fields__}

        def plan(offload: str, device: str = "cuda") -> LoadPlan:
            from qwen_edit_worker import placement

            made = placement.plan({"transformer": 1}, 10**12, offload)
            return LoadPlan(**{**fields, "device": device, "plan": made})  # type: ignore[arg-type]

        assert plan("none").early_text and plan("text_encoder").early_text
        assert not plan("model").early_text and not plan("group").early_text
        assert plan("model", "cpu").early_text  # no GPU: nothing streams


def test_the_read_ahead_reads_a_folder_in_load_order_and_releases(tmp_path: Path) -> None:
    """model/readahead.py on a saved tiny folder: every weights file, text stage first, transformer after; the
    readers never run more than the window ahead of what the load released."""
    import diffusers

    from qwen_edit_worker.model import readahead, tiny
    from qwen_edit_worker.settings import Settings
    from qwen_edit_worker.weights.variants import VARIANTS

    spec = VARIANTS["edit-2511"]
    getattr(diffusers, spec.pipeline_class)(**tiny.build_components(spec, tiny.base_scheduler())).save_pretrained(
        tmp_path)
    tiny.write_lora(tmp_path / "lightning" / spec.lora_basename)
    order = readahead.load_order(Settings.from_env({"MODEL_PATH": str(tmp_path)}))
    groups = [group for group, _ in order]
    assert groups == sorted(groups, key=readahead.LOAD_ORDER.index)
    assert {"text_encoder", "vae", "transformer", "lightning"} <= set(groups)
    assert {path for _, path in order} == {*tmp_path.glob("*/*.safetensors")}
    reader = readahead.ReadAhead(order, window=1, threads=2)  # a window smaller than a chunk: one release at a time
    reader.start()
    text = sum(p.stat().st_size for g, p in order if g in sequence.TEXT_STAGE_FOLDERS)
    threading.Event().wait(0.3)
    assert reader.read_bytes == 0  # nothing is read beyond the window before the load releases anything
    reader.release(sequence.TEXT_STAGE_FOLDERS, "cpu")
    wait_until(lambda: reader.read_bytes >= text)
    reader.release(("transformer", "lightning", "safety_checker"), "cpu")
    wait_until(lambda: reader.seconds is not None)
    assert reader.read_bytes == reader.total


def test_deployed_the_job_waiting_at_the_start_is_taken_while_the_model_loads(tmp_path: Path) -> None:
    """handler.py under the RunPod SDK's job loop (fake queue on loopback), a job already waiting: it is taken
    before the model is ready (it reports a cold start and the time it waited for the load), its prompt encoded
    early, and answered; a second job queued after it runs warm."""
    import time

    from fake_queue import deployed_worker, serve_queue

    log = tmp_path / "worker.log"
    with serve_queue() as queue:
        queue.put({**small_job(seed=9), "id": "first"})
        started = time.monotonic()
        with deployed_worker(queue, log, LOG_LEVEL="INFO", WARMUP="1") as process:
            first = queue.wait_done(["first"], 240)["first"]
            queue.put({**small_job(seed=9), "id": "second"})
            second = queue.wait_done(["second"], 240)["second"]
            assert process.poll() is None
        taken = queue.of("take", "first")[0].at - started
    out = first.body.get("output")
    assert out is not None, (first.body, log.read_text()[-3000:])
    timing = out["timing"]
    assert timing["cold_start"] is True and timing["load_ms"] > 0 and timing["text_encode_ms"] > 0
    warm = second.body["output"]
    assert warm["timing"]["cold_start"] is False and warm["images"][0]["image"] == out["images"][0]["image"]
    text = log.read_text()
    assert "load timeline: " in text and text.index("model ready") < text.index("job first done")
    print(f"first job taken {taken:.1f} s after the process started; waited {timing['load_ms']:.0f} ms for the load")
