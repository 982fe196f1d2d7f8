"""`python -m qwen_edit_worker.placement` answering one job, and the harness command's arguments.

The job answer: one JSON object with `fits`, `batched_images` and `peak_gb` by phase (GB on the GPU
at the phase's peak, weights included); exit 0 when it fits, 1 (with `reason`) when not, 2 on a
bad argument with one line and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen_edit_worker.placement import measure
from qwen_edit_worker.placement.__main__ import main

CLASS = ["--gpu-gb", "80", "--precision", "bf16", "--text-encoder-precision", "bf16"]


def answer(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    code = main([*CLASS[:2], *args] if args and args[0] != "--gpu-gb" else list(args))
    return code, json.loads(capsys.readouterr().out)


def test_a_job_that_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = answer(capsys, *CLASS, "--variant", "edit-2511", "--megapixels", "1", "--pictures", "1",
                       "--images", "4")
    assert code == 0 and out["fits"] is True and out["batched_images"] == 4
    peaks = out["peak_gb"]
    assert set(peaks) == {"text", "denoise", "decode"}  # type: ignore[arg-type]
    # weights included: the bf16 transformer alone is 40.9 GB, all three 57.7 GB resident on 80 GB
    assert all(57.7 < v < 80 for v in peaks.values())  # type: ignore[union-attr]


def test_a_job_that_does_not_fit_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = answer(capsys, "--gpu-gb", "24", "--precision", "int8", "--text-encoder-precision", "int8",
                       "--megapixels", "4", "--pictures", "3", "--images", "1")
    assert code == 1 and out["fits"] is False and out["batched_images"] == 0
    assert "input.megapixels" in str(out["reason"])
    assert out["peak_gb"]["denoise"] > 24  # type: ignore[index]


@pytest.mark.parametrize("bad", [["--megapixels", "9"], ["--megapixels", "1", "--pictures", "4"],
                                 ["--megapixels", "1", "--images", "0"], ["--megapixels", "big"]])
def test_bad_job_arguments_exit_2_without_a_traceback(bad: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "qwen_edit_worker.placement", *CLASS, *bad], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stdout == ""


def test_without_job_flags_it_answers_for_the_class(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = answer(capsys, *CLASS)
    assert code == 0 and out["offload"] == "none" and "need_gb" in out


def test_measure_command_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert measure.main(["--pictures", "4"]) == 2
    assert "--pictures 1 to 3" in capsys.readouterr().err
