"""Several jobs in one worker: the GPU section, the queue wait each job reports, the load-failure policy
for a failed load, and the RunPod SDK's log level.  (The deployed process: test_deployed.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import small_job, tiny_env
from qwen_edit_worker.accounting.timing import StageClock, billed_seconds
from qwen_edit_worker.errors import ModelLoadError
from qwen_edit_worker.serving.gpu_section import GpuSection
from qwen_edit_worker.serving.logs import runpod_log_level
from qwen_edit_worker.serving.worker import Worker


class TestGpuSection:
    def test_one_at_a_time_in_order_on_one_thread_and_the_wait_is_queue_time(self) -> None:
        section = GpuSection()
        clocks = [StageClock(), StageClock(), StageClock()]
        spans: list[tuple[str, float, float, int]] = []
        first_inside = threading.Event()

        def job(name: str, clock: StageClock, hold: float) -> None:
            def work() -> str:
                first_inside.set()
                start = time.perf_counter()
                time.sleep(hold)
                spans.append((name, start, time.perf_counter(), threading.get_ident()))
                return name

            assert section.run(clock, work) == name

        threads = [threading.Thread(target=job, args=("a", clocks[0], 0.3))]
        threads[0].start()
        first_inside.wait(5)
        for name, clock in (("b", clocks[1]), ("c", clocks[2])):
            threads.append(threading.Thread(target=job, args=(name, clock, 0.05)))
            threads[-1].start()
            time.sleep(0.05)  # b asks before c
        for thread in threads:
            thread.join(5)
        assert [name for name, *_ in spans] == ["a", "b", "c"]  # in the order they asked
        for (_, _, end, _), (_, start, _, _) in zip(spans, spans[1:], strict=False):
            assert start >= end  # never two jobs inside
        assert len({ident for *_, ident in spans}) == 1  # all on the section's one thread
        assert clocks[0].seconds["queue"] < 0.05
        assert clocks[1].seconds["queue"] == pytest.approx(0.25, abs=0.12)
        assert clocks[0].seconds["gpu"] == pytest.approx(0.3, abs=0.1)

    def test_errors_reach_the_caller(self) -> None:
        def broken() -> None:
            raise ValueError("inside the section")

        clock = StageClock()
        with pytest.raises(ValueError, match="inside the section"):
            GpuSection().run(clock, broken)
        assert "gpu" in clock.seconds

    def test_billed_seconds_leave_the_wait_out(self) -> None:
        clock = StageClock()
        clock.add("queue", 0.2)
        time.sleep(0.25)
        assert billed_seconds(clock) == pytest.approx(clock.elapsed() - 0.2, abs=0.02)
        assert billed_seconds(StageClock()) < 0.01


class TestWorkerConcurrency:
    def test_two_jobs_at_once_one_waits_and_says_so(self) -> None:
        worker = Worker(tiny_env(CONCURRENCY="2"))
        assert worker.concurrency(1) == 2
        worker.handle(small_job())  # load first, so neither job below waits for loading
        results: dict[int, dict[str, Any]] = {}

        def run(n: int) -> None:
            results[n] = worker.handle({**small_job(seed=n), "id": f"job-{n}"})

        threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        timings = [results[n]["timing"] for n in (1, 2)]
        waited = max(timings, key=lambda t: t["queue_ms"])
        assert waited["queue_ms"] > 0.5 * min(t["gpu_ms"] for t in timings)  # it waited about a job's GPU time
        for n in (1, 2):
            timing, cost = results[n]["timing"], results[n]["cost"]
            assert cost["seconds"] == pytest.approx((timing["total_ms"] - timing["queue_ms"]) / 1000, abs=0.02)
            assert results[n]["seed"] == n

    def test_concurrency_setting_and_its_fallback(self) -> None:
        assert Worker(tiny_env(CONCURRENCY="1")).concurrency(2) == 1
        assert Worker({"CONCURRENCY": "9"}).concurrency(2) == 1  # a bad setting: one job at a time, each told


class TestLoadFailurePolicy:
    """Jobs are taken while the model loads (no fitness check waits for it), so a failed load answers them:
    a cause of this machine (a CUDA error, out of memory) with `refresh_worker` (RunPod replaces the worker:
    other hardware may load), any other cause with the error alone (a new worker would fail the same way)."""

    def test_a_machine_fault_answers_the_job_and_asks_for_a_new_worker(self) -> None:
        worker = Worker(tiny_env(WARMUP="1"))

        def broken() -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        worker.model._load = broken
        worker.start()
        for _ in range(2):
            out = worker.handle(small_job())
            assert out["refresh_worker"] is True
            assert out["error"] == ("model: loading failed (RuntimeError: CUDA error: an illegal memory access was "
                                    "encountered); see the worker log")

    def test_an_unforeseen_cause_not_of_the_machine_is_the_error_alone(self) -> None:
        worker = Worker(tiny_env(WARMUP="1"))

        def broken_install() -> None:
            raise ImportError("cannot import name 'QwenImageEditPlusPipeline' from 'diffusers'")

        worker.model._load = broken_install
        out = worker.handle(small_job())
        assert "refresh_worker" not in out and out["error"].startswith("model: loading failed (ImportError: ")

    def test_foreseen_load_failure_is_the_error_alone(self, tmp_path: Path) -> None:
        worker = Worker({"MODEL_PATH": str(tmp_path / "missing"), "WARMUP": "1"})
        worker.start()
        out = worker.handle(small_job())
        assert out["error"].startswith("MODEL_PATH: ") and "refresh_worker" not in out

    def test_named_error_from_anywhere_in_the_load_counts_as_foreseen(self) -> None:
        worker = Worker(tiny_env(WARMUP="1"))

        def fp8_on_an_old_gpu() -> None:
            raise ModelLoadError("PRECISION", "fp8 needs compute capability 8.9 or newer")

        worker.model._load = fp8_on_an_old_gpu
        assert worker.handle(small_job()) == {"error": "PRECISION: fp8 needs compute capability 8.9 or newer"}

    def test_warmup_off_does_not_load_until_a_job(self) -> None:
        lazy = Worker(tiny_env(WARMUP="0"))
        lazy.start()
        assert not lazy.model.started
        assert "error" not in lazy.handle(small_job()) and lazy.model.ready


class TestSdkLogLevel:
    @pytest.mark.parametrize(("ours", "sdk"), [("DEBUG", "INFO"), ("INFO", "INFO"), ("WARNING", "WARN"),
                                               ("ERROR", "ERROR"), ("error", "ERROR")])
    def test_follows_log_level_never_below_info(self, ours: str, sdk: str) -> None:
        assert runpod_log_level(ours, {}) == sdk

    def test_explicit_runpod_log_level_wins(self) -> None:
        assert runpod_log_level("ERROR", {"RUNPOD_LOG_LEVEL": "debug"}) == "DEBUG"
