"""The bench/ scripts run and print what they promise (their quick modes; figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
DOCS = BENCH.parent / "docs" / "benchmarks.md"
SESSION_STEPS = ["install", "env", "warm_jobs", "attention", "precision", "memory_24gb", "compile", "cold_start"]


def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script", ["overhead", "tiny", "gpu", "coldstart", "throughput", "gpu-session", "bake"])
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
            "end to end, local API: 1 MP PNG in, 1 MP PNG out", "safety check: 1 MP picture, tiny checker (CPU)"
            } <= set(stages)
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


def test_throughput_compare_queue_and_load_balancing_paths() -> None:
    out = run("throughput", "--compare", "--jobs", "2", "--model-ms", "200", "--standin-side", "128", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {(row["path"], row["requests"]): row for row in json.loads(out.stdout)["rows"]}
    assert set(rows) == {(path, kind) for path in ("queue", "lb") for kind in ("alone", "burst of 2")}
    for row in rows.values():
        assert row["model_ms"] == pytest.approx(200, abs=60)
        assert row["latency_ms"] > row["model_ms"] and row["max_beyond_model_ms"] >= row["beyond_model_ms"] > 0


def test_coldstart_on_a_saved_tiny_folder() -> None:
    out = run("coldstart", "--tiny-folder", "--runs", "1", "--megapixels", "0.0625", "--json", "--port", "8179")
    assert out.returncode == 0, out.stderr[-2000:]
    [row] = json.loads(out.stdout)["rows"]
    assert 0 < row["ready_s"] < row["first_image_s"] and row["folder_gb"] > 0


def test_bake_before_and_after_and_through_bake_py_at_narrow_width(tmp_path: Path) -> None:
    """bench/bake's figures exist and mean what they say (not their values): both paths prepare the same folder and
    store the same tensors, the streamed one through bake.py from a loopback hub too."""
    out = run("bake", "--narrow", "--blocks", "1", "--precision", "int8", "--hub", "--json", "--scratch",
              str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(out.stdout)["rows"]}
    assert set(rows) == {"before", "after", "after, bake.py from a hub"}
    assert rows["before"]["identical"] is True and rows["after"]["identical"] is True
    for r in rows.values():
        assert r["peak_anon_gb"] > 0.1 and r["peak_rss_gb"] >= r["peak_anon_gb"] and r["samples"] > 0
        assert r["cpu_s"] > 0 and r["wall_s"] >= r["prepare_s"] > 0 and r["input_gb"] > 0 and r["output_gb"] > 0
        assert r["prepared"]["quantised"]["transformer"]["layers"] == rows["before"]["prepared"]["quantised"][
            "transformer"]["layers"]
    assert rows["after"]["derived_60_blocks_prepare_s"] > 0  # not the hub row's: its seconds include the download
    assert rows["after, bake.py from a hub"]["derived_60_blocks_prepare_s"] is None
    assert not any(tmp_path.iterdir())  # the work folders are removed
    bad = run("bake", "--narrow", "--blocks", "0")
    assert bad.returncode == 2 and "--blocks: numbers from 1 to 60" in bad.stderr


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
    fp8 = rows[("edit-2511", "fused, fp8, text encoder fp8")]  # baked on a CPU (weights/fp8_cpu.py)
    assert fp8["transformer_gb"] == pytest.approx(20.46, abs=0.01)
    assert fp8["text_encoder_gb"] == pytest.approx(9.52, abs=0.01)
    assert fp8["read_at_start_gb"] == pytest.approx(30.23, abs=0.01)  # the fp8 classes read ~30 GB at start, not 58


def test_gpu_deviation_against_bf16_on_the_tiny_model() -> None:
    out = run("gpu", "--tiny", "--json", "--deviation", "int8,fp8")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)["rows"]
    int8 = [r for r in rows if r["transformer"] == "int8"]
    assert len(int8) == 2 and all(0 < r["step_rel_l2_pct"] < 100 and 0 < r["pixels_rel_l2_pct"] < 100 for r in int8)
    assert all("fp8 needs a CUDA GPU" in r["note"] for r in rows if r["transformer"] == "fp8")


def session_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "session.jsonl").read_text().splitlines()]


class TestGpuSession:
    """bench/gpu-session: the plan, the wheels, the steps on the tiny model, assembly and report."""

    def test_dry_run_plan_fits_one_device_call_and_docs_give_its_command(self) -> None:
        out = run("gpu-session", "--dry-run", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        plan = json.loads(out.stdout)
        assert [s["step"] for s in plan["steps"]] == SESSION_STEPS  # most important first
        assert sum(s["budget_s"] for s in plan["steps"]) <= plan["deadline_s"] < plan["device_call"]["timeout_s"] <= 570
        assert {"diffusers==0.42.1", "torchao==0.18.0", "xformers==0.0.35", "runpod==1.12.0"} <= set(plan["wheels"])
        assert any(w.startswith("nvidia-cuda-runtime-cu12==") for w in plan["wheels"])
        call = plan["device_call"]
        assert call["carry"] == [".whl"] and "--out $OUT" in call["command"] and "--wheels .whl" in call["command"]
        docs = DOCS.read_text()
        assert f'run(command="{call["command"]}", carry=[".whl"], timeout_s={call["timeout_s"]})' in docs
        text = run("gpu-session", "--dry-run")
        assert text.returncode == 0 and "timeout_s=570" in text.stdout and "cold_start" in text.stdout

    def test_gather_wheels_dry_run_lists_them_and_downloads_nothing(self, tmp_path: Path) -> None:
        out = run("gpu-session", "--gather-wheels", str(tmp_path / "whl"), "--dry-run")
        assert out.returncode == 0, out.stderr[-2000:]
        assert "diffusers==0.42.1" in out.stdout and "pip download --no-deps --only-binary=:all:" in out.stdout
        assert "--python-version 3.12" in out.stdout and "not carried: flash-attn" in out.stdout
        assert not (tmp_path / "whl").exists()

    def test_unknown_step_is_refused_by_name(self) -> None:
        out = run("gpu-session", "--dry-run", "--steps", "warm_jobs,warp")
        assert out.returncode == 2 and "unknown step(s) ['warp']" in out.stderr

    def test_lines_survive_a_cut_write(self, tmp_path: Path) -> None:
        import sys

        sys.path.insert(0, str(BENCH))
        import session_results

        lines = tmp_path / session_results.LINES
        session_results.emit(lines, {"kind": "env", "gpu": None, "date": "2026-12-01"})
        session_results.emit(lines, {"kind": "run", "step": "warm_jobs", "megapixels": 1.0, "outcome": "ok"})
        with lines.open("a") as handle:
            handle.write('{"kind": "run", "step": "warm_jo')  # a writer killed mid-line
        records, bad = session_results.read(lines)
        assert [r["kind"] for r in records] == ["env", "run"] and bad == 1
        results = session_results.assemble(tmp_path)
        assert results["unreadable_lines"] == 1 and results["runs"][0]["megapixels"] == 1.0
        assert session_results.results_path(results, tmp_path).name == "2026-12-01-cpu-tiny.json"
        assert session_results.results_path({"gpu": "NVIDIA H200", "date": "2026-12-02"}, tmp_path).name == \
            "2026-12-02-h200.json"

    def test_report_of_a_gpu_results_file_says_measured_and_what_each_figure_decides(self) -> None:
        import sys

        sys.path.insert(0, str(BENCH))
        import session_results

        def run_(step: str, precision: str, ms: float, first: bool = False, **more: object) -> dict:
            return {"step": step, "variant": "edit-2511", "megapixels": 1.0, "num_images": 1, "precision": precision,
                    "compile": "off", "attention_backend": "_native_cudnn", "stages_ms": {"denoise": ms * 0.6},
                    "job_ms": ms, "outside_gpu_ms": ms * 0.02, "ms_per_step": ms / 5, "first": first,
                    "outcome": "ok", "peak_gpu_bytes": 64e9, "resident_gpu_bytes": 58e9, **more}

        results = {"gpu": "NVIDIA H200", "date": "2026-12-02", "driver": "580", "torch": "2.11.0", "command": "x",
                   "weights": "random", "peak_bf16_tflops": 790.0, "steps": [{"step": "env", "status": "ok"}],
                   "runs": [run_("warm_jobs", "bf16", 3000.0, first=True), run_("warm_jobs", "bf16", 1000.0),
                            run_("memory_24gb", "int8", 2000.0, num_images=4, megapixels=2.0,
                                 peak_gpu_bytes=30e9, resident_gpu_bytes=21e9, vae_tiled=True)],
                   "attention": [{"backend": "_native_cudnn", "ms_per_step": 200.0, "step_tflops": 395.0},
                                 {"backend": "xformers", "unusable": "ImportError: libcudart.so.12 | missing"}],
                   "deviation": {"bf16": {"ms_per_step": 200.0}, "fp8": {"ms_per_step": 150.0}},
                   "compile": {"compile_s": 40.0, "ms_per_step": 160.0, "off_ms_per_step": 200.0}}
        text = session_results.report(results)
        assert text.startswith("**Measured** on NVIDIA H200") and "not a GPU" not in text
        assert "| _native_cudnn | 200 | 395.0 | 50% |" in text and "libcudart.so.12 \\| missing" in text
        assert "warm 1 MP bf16 job 1000 ms (target < 1200: met); outside the GPU stages 20 ms = 2.0%" in text
        assert "cost H200: 1.00 s x 0.00155 USD/s = 0.00155 USD per image (measured)" in text
        assert "cost H100: 1.00 s x 0.00116 USD/s = 0.00116 USD per image (this run's seconds at its price)" in text
        assert "PRECISION: fastest per step fp8" in text and "COMPILE: regional saves 20% a step" in text
        assert ("9.0 GB of activations over the resident weights "
                "(2.0 MP, 4 images, int8, memory_24gb), 0.72x the derived 12.5 GB") in text  # tiled: denoise peaks

    @pytest.mark.timeout(900)
    def test_tiny_session_runs_every_step_then_assembles_and_reports(self, tmp_path: Path) -> None:
        steps = [s for s in SESSION_STEPS if s != "compile"]  # compile: the next test (minutes on this CPU)
        out = run("gpu-session", "--tiny", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none"),
                  "--steps", ",".join(steps), "--profile-over-ms", "0", "--scratch", str(tmp_path / "scratch"),
                  timeout=850)
        assert out.returncode == 0, out.stderr[-2000:]
        records = session_records(tmp_path / "out")
        status = {r["step"]: r["status"] for r in records if r["kind"] == "step"}
        assert status == {"install": "skipped", **{s: "ok" for s in steps[1:]}}, status
        assert not [r for r in records if r["kind"] == "error"]
        warm = [r for r in records if r["kind"] == "run" and r["step"] == "warm_jobs"]
        assert [r["megapixels"] for r in warm] == [1.0] * 4 + [0.5] * 3 + [2.0] * 3 and warm[0]["first"]
        for r in warm:
            assert r["outcome"] == "ok" and r["job_ms"] >= r["handler_total_ms"] > 0
            assert {"inputs", "text_encode", "vae_encode", "denoise", "decode", "outputs"} <= set(r["stages_ms"])
            gpu = sum(r["stages_ms"][s] for s in ("text_encode", "vae_encode", "denoise", "decode"))
            assert r["outside_gpu_ms"] == pytest.approx(r["job_ms"] - gpu, abs=0.05)
        attention = {r["backend"]: r for r in records if r["kind"] == "attention"}
        assert attention["native"]["ms_per_step"] > 0 and "not installed" in attention["flash"]["unusable"]
        deviation = {r["precision"]: r for r in records if r["kind"] == "deviation"}
        assert 0 < deviation["int8"]["step_rel_l2_pct"] < 100 and 0 < deviation["int8"]["pixels_rel_l2_pct"] < 100
        assert "fp8 needs a CUDA GPU" in deviation["fp8"]["note"] and deviation["bf16"]["ms_per_step"] > 0
        small = [r for r in records if r["kind"] == "run" and r["step"] == "memory_24gb"]
        assert {(r["megapixels"], r["num_images"]) for r in small} == {(1.0, 1), (1.0, 4), (2.0, 1), (2.0, 4)}
        assert all(r["outcome"] == "ok" and r["precision"] == "int8" and not r["simulated"] for r in small)
        cold = {k: v for r in records if r["kind"] == "cold_start" for k, v in r.items()}
        assert cold["load_s"] > 0 and cold["lora_layers"] > 0 and cold["folder_gb"] > 0 and cold["first_job_ms"] > 0
        [profile] = [r for r in records if r["kind"] == "profile"]
        assert profile["top"] and (tmp_path / "out" / "profile.txt").read_text().strip()

        saved = tmp_path / "results.json"
        assembled = run("gpu-session", "--assemble", str(tmp_path / "out"), "--save", str(saved))
        assert assembled.returncode == 0 and assembled.stdout.strip() == str(saved)
        results = json.loads(saved.read_text())
        assert {"gpu", "date", "torch", "driver", "runs", "cold_start", "deviation"} <= set(results)
        assert results["gpu"] is None and results["measured_on_gpu"] is False
        assert all({"variant", "megapixels", "num_images", "attention_backend", "precision", "compile", "stages_ms",
                    "job_ms", "outside_gpu_ms", "peak_gpu_bytes"} <= set(r) for r in results["runs"])
        assert results["cold_start"]["load_s"] == cold["load_s"] and "int8" in results["deviation"]
        report = run("gpu-session", "--report", str(saved))
        assert report.returncode == 0, report.stderr[-2000:]
        assert "not a GPU measurement" in report.stdout and "**Measured**" not in report.stdout
        assert "| warm_jobs | 1.0 | 1 | bf16 | off |" in report.stdout and "| int8 |" in report.stdout
        assert "PRECISION: fastest per step" in report.stdout and "not a GPU figure" in report.stdout

    @pytest.mark.timeout(900)
    def test_a_step_over_budget_is_cut_and_the_next_runs(self, tmp_path: Path) -> None:
        # warm_jobs gets 602 - 600 = 2 s (less than its imports take); compile keeps its own 600 s.
        out = run("gpu-session", "--tiny", "--out", str(tmp_path), "--steps", "warm_jobs,compile", "--budgets",
                  "warm_jobs=2,compile=600", "--deadline", "602", "--scratch", str(tmp_path / "scratch"), timeout=850)
        assert out.returncode == 0, out.stderr[-2000:]
        records = session_records(tmp_path)
        steps = {r["step"]: r for r in records if r["kind"] == "step"}
        assert steps["warm_jobs"]["status"] == "cut" and steps["warm_jobs"]["seconds"] < 10
        assert steps["compile"]["status"] == "ok", (tmp_path / "session.log").read_text()[-3000:]
        [compiled] = [r for r in records if r["kind"] == "compile"]
        assert compiled["compile_s"] > 0 and compiled["ms_per_step"] > 0 and compiled["new_size_job_ms"] > 0
        assert compiled["off_ms_per_step"] is None  # warm_jobs was cut before it measured anything
        runs = [r for r in records if r["kind"] == "run"]
        assert runs and all(r["compile"] == "regional" and r["step"] == "compile" for r in runs)
