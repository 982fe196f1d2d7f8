"""handler.py exactly as RunPod runs it (RUNPOD_WEBHOOK_* set), served by a fake queue on loopback.

What broke before: with a synchronous handler the SDK's job loop was blocked while a job ran and
took the next job only about a second after each result; the SDK's own logger printed a DEBUG
line for every poll and heartbeat; a worker whose model failed to load had no say in whether
RunPod replaced it.  (The job waiting at the start, taken while the model loads: test_coldstart_jobs.py.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import b64_picture, small_job
from fake_queue import ROOT, FakeQueue, deployed_worker, serve_queue
from lora_files import FileServer, Route, lora_bytes
from runpod_examples import example, served, serving_examples

JOB_TIMEOUT = 240  # seconds; the tiny model takes a few seconds per job on 2 shared cores
START_TIMEOUT = 240


def job(job_id: str, **fields: object) -> dict[str, object]:
    return {**small_job(**fields), "id": job_id}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeQueue, Path]]:
    """One deployed tiny worker with CONCURRENCY=2, shared by the tests of this module."""
    log = tmp_path_factory.mktemp("deployed") / "worker.log"
    cache = tmp_path_factory.mktemp("lora-cache")  # request LoRAs from a loopback file server (TestDeployedLoras)
    with serve_queue() as queue, deployed_worker(queue, log, CONCURRENCY="2", LOG_LEVEL="INFO",
                                                 ALLOW_LOOPBACK_URLS="1", LORA_CACHE_DIR=str(cache)) as process:
        queue.put(job("warm-up"))
        try:
            queue.wait_done(["warm-up"], START_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"the worker never answered (exit {process.poll()}):\n{log.read_text()[-3000:]}")
        yield queue, log


class TestDeployedJobs:
    def test_result_timing_and_progress_per_step(self, worker: tuple[FakeQueue, Path]) -> None:
        queue, _ = worker
        queue.put(job("ok-1", seed=11))
        done = queue.wait_done(["ok-1"], JOB_TIMEOUT)["ok-1"]
        output = done.body["output"]
        assert "error" not in done.body and output["seed"] == 11
        assert output["images"][0]["width"] == 64 and output["images"][0]["type"] == "base64"
        timing = output["timing"]
        assert timing["steps"] == 3 and timing["queue_ms"] >= 0 and 0 < timing["gpu_ms"] <= timing["total_ms"]
        queue.wait_for(lambda: len(queue.of("progress", "ok-1")) >= 3, 30, "three progress posts")
        steps = sorted(e.body["output"]["step"] for e in queue.of("progress", "ok-1"))
        assert steps == [1, 2, 3]
        assert all(e.body["output"]["steps"] == 3 for e in queue.of("progress", "ok-1"))

    def test_clean_error_then_a_valid_job(self, worker: tuple[FakeQueue, Path]) -> None:
        queue, _ = worker
        queue.put(job("bad-1", num_images=9), job("ok-2"))
        results = queue.wait_done(["bad-1", "ok-2"], JOB_TIMEOUT)
        bad = results["bad-1"].body
        assert bad["error"].startswith("input.num_images: must be a whole number from 1 to 4")
        assert "Traceback" not in bad["error"] and "stopPod" not in bad
        assert results["ok-2"].body["output"]["images"]

    def test_concurrency_2_takes_the_next_job_while_one_runs(self, worker: tuple[FakeQueue, Path]) -> None:
        queue, _ = worker
        ids = [f"burst-{i}" for i in range(3)]
        queue.put(*(job(i, seed=n) for n, i in enumerate(ids)))
        results = queue.wait_done(ids, 3 * JOB_TIMEOUT)
        takes = {e.job_id: e.at for e in queue.of("take") if e.job_id in ids}
        assert takes["burst-1"] < results["burst-0"].at  # the second was taken before the first finished
        for event in queue.of("take"):  # never more than CONCURRENCY jobs held at once
            held = [e for e in queue.of("take") if e.at <= event.at]
            finished = [e for e in queue.of("done") if e.at < event.at]
            assert len(held) - len(finished) <= 2
        timings = [results[i].body["output"]["timing"] for i in ids]
        assert max(t["queue_ms"] for t in timings) > 0  # someone waited for the GPU, and says so
        span_ms = (max(r.at for r in results.values()) - min(takes.values())) * 1000
        assert sum(t["gpu_ms"] for t in timings) <= span_ms  # one job at a time in the GPU section
        for timing, result in zip(timings, (results[i] for i in ids), strict=True):
            cost = result.body["output"]["cost"]
            assert cost["seconds"] == pytest.approx((timing["total_ms"] - timing["queue_ms"]) / 1000, abs=0.05)

    def test_logs_follow_log_level_and_hold_no_picture(self, worker: tuple[FakeQueue, Path]) -> None:
        queue, log = worker
        queue.wait_for(lambda: len(queue.of("ping")) >= 1, 30, "a heartbeat")
        assert queue.of("ping")[0].body == "fake-key"
        text = log.read_text()
        sdk_lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"requestId"')]
        assert sdk_lines, text[-2000:]  # the SDK does log (as JSON lines, as on RunPod) ...
        assert {line["level"] for line in sdk_lines} <= {"INFO", "WARN", "ERROR"}  # ... but not at DEBUG
        assert "Heartbeat Sent" not in text and b64_picture()[-60:] not in text


def test_foreseen_load_error_keeps_serving_the_clear_error(tmp_path: Path) -> None:
    """A missing model folder fails the same way on any worker: stay up and tell every job."""
    missing = tmp_path / "missing"
    with serve_queue() as queue, deployed_worker(queue, tmp_path / "worker.log", TINY_MODEL="0",
                                                 MODEL_PATH=str(missing)) as process:
        queue.put(job("j-1"), job("j-2"))
        results = queue.wait_done(["j-1", "j-2"], START_TIMEOUT)
        for result in results.values():
            assert result.body["error"] == (f"MODEL_PATH: {missing} does not exist; bake the model into the image "
                                            "or point MODEL_PATH at it")
        assert process.poll() is None
        assert not [e for e in queue.of("ping") if e.query.get("status") == ["unhealthy"]]


def test_a_load_that_fails_for_a_cause_of_the_machine_answers_the_waiting_job_and_asks_for_a_new_worker(
        tmp_path: Path) -> None:
    """The job waiting at the start is taken while the model loads; the load then breaks for a cause of the
    machine (here a simulated CUDA error from a broken install): the job gets the load's error, never lost, and
    the worker asks RunPod to replace it (stopPod: true) instead of failing every job on this hardware."""
    broken = tmp_path / "site" / "diffusers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("CUDA error: unspecified launch failure (simulated)")\n')
    log = tmp_path / "worker.log"
    path = os.pathsep.join([str(broken.parent), str(ROOT / "src")])
    with serve_queue() as queue, deployed_worker(queue, log, PYTHONPATH=path):
        queue.put(job("waiting"))
        try:
            done = queue.wait_done(["waiting"], START_TIMEOUT)["waiting"]
        except TimeoutError:
            pytest.fail(f"the job was not answered:\n{log.read_text()[-3000:]}")
        assert done.body["error"] == ("model: loading failed (RuntimeError: CUDA error: unspecified launch failure "
                                      "(simulated)); see the worker log"), done.body
        assert done.body.get("stopPod") is True  # RunPod stops the pod after this answer and starts another
        assert not [e for e in queue.of("ping") if e.query.get("status") == ["unhealthy"]]


class TestDeployedLoras:
    def test_a_lora_job_changes_the_picture_and_the_next_job_without_is_as_before(
            self, worker: tuple[FakeQueue, Path]) -> None:
        """input.loras as a deployed endpoint gets it: fetched by URL, applied, reported, never left on."""
        queue, log = worker
        with FileServer({"/style.safetensors": Route(lora_bytes(40))}) as server:
            url = f"{server.url}/style.safetensors?X-Amz-Signature=SECRET-SIG"
            queue.put(job("plain-before", seed=5))
            queue.wait_done(["plain-before"], JOB_TIMEOUT)
            queue.put(job("lora-1", seed=5, loras=[{"path": url, "scale": 1.0}]))
            queue.wait_done(["lora-1"], JOB_TIMEOUT)
            queue.put(job("lora-2", seed=5, loras=[{"path": url, "scale": 1.0}]))
            queue.put(job("plain-after", seed=5))
            results = queue.wait_done(["lora-2", "plain-after"], 2 * JOB_TIMEOUT)
            assert server.hits["/style.safetensors"] == 1  # the second LoRA job read the worker's cache
        before = queue.results()["plain-before"].body["output"]
        first = queue.results()["lora-1"].body
        assert "error" not in first, first
        (applied,) = first["output"]["model"]["loras"]
        assert applied["source"] == "url" and applied["layers"] > 0 and not applied["cached"]
        assert "SECRET" not in json.dumps(first) and first["output"]["timing"]["lora_ms"] > 0
        assert results["lora-2"].body["output"]["model"]["loras"][0]["cached"]
        assert first["output"]["images"][0]["image"] != before["images"][0]["image"]
        assert results["lora-2"].body["output"]["images"][0]["image"] == first["output"]["images"][0]["image"]
        after = results["plain-after"].body["output"]
        assert after["images"][0]["image"] == before["images"][0]["image"]  # nothing left behind
        assert after["model"]["loras"] == [] and after["timing"]["lora_ms"] == 0
        text = log.read_text()
        assert "SECRET" not in text and applied["sha256"] in text  # the log names the LoRA by content only


class TestDeployedRunPodRequests:
    @pytest.mark.timeout(900)  # a 1 MP job on the tiny model's VAE: ~20 s on 2 free cores, minutes on shared ones
    def test_their_2511_example_runs_unchanged(self, worker: tuple[FakeQueue, Path]) -> None:
        """The docs' example for RunPod's public qwen-image-edit-2511 endpoint, under the SDK's job loop
        (their other two examples run through Worker.handle in test_runpod_requests.py)."""
        queue, _ = worker
        with serving_examples() as files:
            queue.put(served(example("qwen-image-edit-2511"), files.url) | {"id": "runpod-2511"})
            done = queue.wait_done(["runpod-2511"], 3 * JOB_TIMEOUT)["runpod-2511"]
        assert "error" not in done.body, done.body
        output = done.body["output"]
        [item] = output["images"]
        assert (item["width"], item["height"], item["format"]) == (1024, 1024, "png")
        assert output["image_url"] == "data:image/png;base64," + item["image"]
        assert isinstance(output["cost"], dict) and "usd" in output["cost"]
