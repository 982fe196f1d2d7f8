"""ATTENTION_BACKEND: auto measures every backend that runs and takes the fastest; an explicit one is
checked with a real call.  The choice logic runs with injected timings (no GPU here); the measuring
function runs for real on the CPU's SDPA kernels, and the chosen backend reaches every processor."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from conftest import small_job
from qwen_edit_worker.errors import ModelLoadError
from qwen_edit_worker.model import attention
from qwen_edit_worker.serving.worker import Worker
from qwen_edit_worker.weights.variants import VARIANTS


def injected(ms: dict[str, float | Exception]) -> tuple[Callable[[str], float], list[str]]:
    """A Measure answering from `ms` (an Exception is raised, as a backend that cannot run does)."""
    calls: list[str] = []

    def measure(name: str) -> float:
        calls.append(name)
        value = ms.get(name, RuntimeError("not in this test"))
        if isinstance(value, Exception):
            raise value
        return value

    return measure, calls


class TestAuto:
    def test_picks_the_fastest_that_runs_and_says_why_others_did_not(self) -> None:
        measure, calls = injected({"native": 5.0, "_native_cudnn": 3.2, "_native_flash": 3.9,
                                   "_native_efficient": RuntimeError("No viable backend"), "xformers": 3.0})
        choice = attention.choose("auto", cuda=True, measure=measure)
        runnable = [n for n in attention.CANDIDATES if not attention._missing_package(n)]
        assert calls == runnable  # every installed candidate was measured, in order
        expected = "xformers" if "xformers" in runnable else "_native_cudnn"
        assert choice.backend == expected and choice.how == "auto: fastest measured"
        assert choice.timings_ms["native"] == 5.0 and "_native_efficient" not in choice.timings_ms
        assert choice.unusable["_native_efficient"].startswith("RuntimeError: No viable backend")
        if "flash" not in runnable:
            assert choice.unusable["flash"] == "the flash_attn package is not installed"

    def test_a_near_tie_goes_to_the_simpler_backend(self) -> None:
        assert attention.pick_fastest({"native": 10.1, "_native_cudnn": 10.0}) == "native"  # within 2%
        assert attention.pick_fastest({"native": 10.5, "_native_cudnn": 10.0}) == "_native_cudnn"

    def test_nothing_runs_is_a_load_error(self) -> None:
        measure, _ = injected({})
        with pytest.raises(ModelLoadError) as caught:
            attention.choose("auto", cuda=True, measure=measure)
        assert str(caught.value).startswith("ATTENTION_BACKEND: no attention backend ran on this GPU")

    def test_without_cuda_auto_is_native_and_measures_nothing(self) -> None:
        measure, calls = injected({"native": 1.0})
        choice = attention.choose("auto", cuda=False, measure=measure)
        assert (choice.backend, choice.how, choice.timings_ms, calls) == ("native", "auto: no CUDA device", {}, [])

    def test_the_real_measurer_times_real_kernels(self) -> None:
        """On the CPU's SDPA kernels: native runs and is timed; cuDNN's kernel does not exist here."""
        measure = attention.measurer(128, device="cpu", dtype=torch.float32, budget=0.01)
        choice = attention.choose("auto", cuda=True, measure=measure)
        assert choice.timings_ms["native"] > 0 and choice.backend in choice.timings_ms
        assert "_native_cudnn" in choice.unusable and "xformers" in choice.unusable  # no CUDA kernels here

    def test_shape_is_the_models_1mp_sequence(self) -> None:
        assert attention.sequence_length(VARIANTS["edit-2511"]) == 4096 + 4096 + 258
        assert attention.sequence_length(VARIANTS["edit"]) == 4096 + 4096 + 1407


class TestExplicit:
    def test_explicit_backend_is_kept_after_one_real_call(self) -> None:
        measure, calls = injected({"_native_cudnn": 2.0, "native": 1.0})
        choice = attention.choose("_native_cudnn", cuda=True, measure=measure)
        assert (choice.backend, choice.how, calls) == ("_native_cudnn", "explicit", ["_native_cudnn"])

    def test_explicit_backend_whose_call_fails_is_a_load_error(self) -> None:
        measure, _ = injected({"_native_flash": RuntimeError("No viable backend")})
        with pytest.raises(ModelLoadError) as caught:
            attention.choose("_native_flash", cuda=True, measure=measure)
        assert str(caught.value).startswith("ATTENTION_BACKEND: _native_flash cannot run here (its attention call "
                                            "failed on this GPU: RuntimeError: No viable backend")

    @pytest.mark.parametrize("backend", ["xformers", "flash", "_native_cudnn", "_native_flash", "_native_efficient"])
    def test_explicit_backend_without_cuda_is_a_clear_error_for_every_job(self, backend: str) -> None:
        with pytest.raises(ModelLoadError) as caught:
            attention.choose(backend, cuda=False, measure=None)
        assert caught.value.subject == "ATTENTION_BACKEND" and "no CUDA device" in str(caught.value)
        error = Worker({"TINY_MODEL": "1", "WARMUP": "0", "ATTENTION_BACKEND": backend}).handle(small_job())["error"]
        assert error.startswith(f"ATTENTION_BACKEND: {backend} cannot run here (no CUDA device)")


class TestApplied:
    def test_backend_is_set_on_every_processor_and_reported(self, worker_for: Callable[..., Worker]) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        worker = worker_for("edit-2511", ATTENTION_BACKEND="native")
        out = worker.handle(small_job())
        assert (out["model"]["attention_backend"], out["model"]["attention_choice"]) == ("native", "explicit")
        pipe = worker.model.get()[0].model.pipe
        processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
        assert processors and all(p._attention_backend == AttentionBackendName.NATIVE for p in processors)
        # The same dispatcher call really switches them (pinned with a CPU-capable alternative).
        attention.apply(pipe.transformer, "_native_math")
        assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in processors)
        attention.apply(pipe.transformer, "native")

    def test_auto_on_cpu_is_reported(self, worker_for: Callable[..., Worker]) -> None:
        out = worker_for("edit-2511").handle(small_job())
        assert (out["model"]["attention_backend"], out["model"]["attention_choice"],
                out["model"]["attention_ms"]) == ("native", "auto: no CUDA device", {})
