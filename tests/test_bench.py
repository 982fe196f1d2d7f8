"""The bench/ scripts run and print what they promise (their quick modes; figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script", ["overhead", "tiny", "gpu", "coldstart", "throughput"])
def test_help(script: str) -> None:
    out = run(script, "--help")
    assert out.returncode == 0 and "--json" in out.stdout


def test_gpu_dry_run_flop_table_matches_the_facts() -> None:
    out = run("gpu", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    rows = {(r["variant"], r["megapixels"]): r for r in result["rows"]}
    assert rows[("edit-2511", 1.0)]["tflop_per_pass"] == pytest.approx(167, rel=0.02)  # facts.md section 6
    assert rows[("edit", 1.0)]["tflop_per_pass"] == pytest.approx(199, rel=0.02)
    assert rows[("edit-2511", 1.0)]["h100_bf16_floor_ms_3_steps"] == pytest.approx(510, rel=0.02)
    params = result["parameters (billions)"]
    assert params["transformer"] == pytest.approx(20.43, abs=0.01)
    assert params["text_encoder"] == pytest.approx(8.29, abs=0.01)
    assert params["vae"] == pytest.approx(0.127, abs=0.001)


def test_gpu_timing_path_on_the_tiny_model() -> None:
    out = run("gpu", "--tiny", "--json", "--compile", "off", "--precision", "bf16,int8,fp8", "--backends", "native")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)["rows"]
    timed = [r for r in rows if r.get("backend") == "native"]
    assert timed and len(timed[0]["step_ms"].split("/")) == 3 and timed[0]["total_ms"] > 0
    assert any("PRECISION: fp8 needs a CUDA GPU" in r.get("note", "") for r in rows)
    assert any(r.get("precision") == "int8" and r.get("total_ms", 0) > 0 for r in rows)  # int8 runs on a CPU


def test_overhead() -> None:
    out = run("overhead", "--json", "--repeat", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    stages = {r["stage"]: r for r in json.loads(out.stdout)["rows"]}
    assert {"input: base64 JPEG -> RGB", "output: RGB -> png -> base64", "whole job, fixed model (png)",
            "end to end, local API: 1 MP PNG in, 1 MP PNG out"} <= set(stages)
    assert all(r["worker_ms"] > 0 and r["bare_ms"] > 0 for r in stages.values())
    end_to_end = stages["end to end, local API: 1 MP PNG in, 1 MP PNG out"]
    assert end_to_end["ratio"] == pytest.approx(end_to_end["worker_ms"] / end_to_end["bare_ms"], abs=0.001)


def test_throughput_burst_through_the_deployed_path() -> None:
    out = run("throughput", "--models", "standin", "--concurrency", "2", "--jobs", "3", "--model-ms", "300",
              "--standin-side", "256", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    [row] = json.loads(out.stdout)["rows"]
    assert row["model"] == "standin" and row["concurrency"] == 2 and row["jobs"] == 3
    assert row["model_ms"] == pytest.approx(300, abs=60)  # the stand-in's sleep, seen through gpu_ms
    assert 0 < row["gpu_busy"] <= 1.0 and row["images_per_min"] > 0 and row["outside_ms"] > 0


def test_coldstart_on_a_saved_tiny_folder() -> None:
    out = run("coldstart", "--tiny-folder", "--runs", "1", "--megapixels", "0.0625", "--json", "--port", "8179")
    assert out.returncode == 0, out.stderr[-2000:]
    [row] = json.loads(out.stdout)["rows"]
    assert 0 < row["ready_s"] < row["first_image_s"] and row["folder_gb"] > 0


def test_gpu_bytes_table_from_the_real_configs() -> None:
    out = run("gpu", "--bytes", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    rows = {(r["variant"], r["bake"]): r for r in result["rows"]}
    today, int8 = rows[("edit-2511", "bf16 (today)")], rows[("edit-2511", "fused, int8, text encoder int8")]
    assert today["transformer_gb"] == pytest.approx(2 * 20.43, abs=0.02)  # bf16: 2 bytes a parameter
    assert today["image_gb"] == pytest.approx(57.7, abs=0.1)  # facts.md section 2
    assert 0.5 < int8["transformer_gb"] / today["transformer_gb"] < 0.52  # ~1 byte a parameter, scales included
    assert int8["text_encoder_gb"] < today["text_encoder_gb"] and "not read" in int8["lora_file"]
    at_load = rows[("edit-2511", "bf16, PRECISION=int8 at load")]
    assert at_load["read_at_start_gb"] == today["read_at_start_gb"] and at_load["held_gb"] < today["held_gb"]


def test_gpu_deviation_against_bf16_on_the_tiny_model() -> None:
    out = run("gpu", "--tiny", "--json", "--deviation", "int8,fp8")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)["rows"]
    int8 = [r for r in rows if r["transformer"] == "int8"]
    assert len(int8) == 2 and all(0 < r["step_rel_l2_pct"] < 100 and 0 < r["pixels_rel_l2_pct"] < 100 for r in int8)
    assert all("fp8 needs a CUDA GPU" in r["note"] for r in rows if r["transformer"] == "fp8")
