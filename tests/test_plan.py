"""`qwen-edit plan`: the endpoint simulator pinned against cases worked by hand, the user's own
numbers, the GPU table against docs/benchmarks.md, and the command (grid, --p95, --plot, --json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from qwen_edit_client import catalog
from qwen_edit_client.cli import main
from qwen_edit_client.plan import poisson
from qwen_edit_client.simulate import Config, Job, simulate
from qwen_edit_worker.accounting.cost import table_price

ROOT = Path(__file__).resolve().parent.parent
PRICE, ACTIVE = 0.001, 0.0008


def endpoint(**settings: float | int) -> Config:
    base = {"max_workers": 1, "active_workers": 0, "idle_timeout_s": 5.0, "cold_start_s": 3.0}
    return Config("test", PRICE, ACTIVE, **(base | settings))  # type: ignore[arg-type]


def every(gap: float, count: int, execution: float) -> list[Job]:
    return [Job(gap * i, execution) for i in range(count)]


class TestHandWorkedCases:
    def test_one_worker_idle_shorter_than_the_gap(self) -> None:
        """Jobs every 60 s, 10.5 s each, idle 5 s, cold start 3 s: the worker stops between jobs, so
        each job bills 3 + 10.5 + 5 = 18.5 s, rounded up to 19; every job waits for a cold start."""
        result = simulate(endpoint(), every(60, 4, 10.5))
        assert result["billed_s"] == pytest.approx({"execution": 42, "idle": 20, "cold_start": 12, "rounding": 2,
                                                   "active": 0, "total": 76})
        assert result["usd_per_image"] == pytest.approx(19 * PRICE)
        assert result["latency_s"]["p50"] == result["latency_s"]["p95"] == pytest.approx(13.5)
        assert (result["cold_start_share"], result["cold_starts"]) == (1.0, 4)

    def test_one_worker_idle_longer_than_the_gap(self) -> None:
        """Jobs every 30 s, 10 s each, idle 60 s: one worker stays up from 0 to 90 + 10 + 60 = 160 s:
        cold 3, execution 40, idle 17 + 20 + 20 + 60 = 117.  Only the first job waits for the start."""
        result = simulate(endpoint(idle_timeout_s=60), every(30, 4, 10))
        assert result["billed_s"] == pytest.approx({"execution": 40, "idle": 117, "cold_start": 3, "rounding": 0,
                                                   "active": 0, "total": 160})
        assert result["usd_per_image"] == pytest.approx(40 * PRICE)
        assert (result["latency_s"]["p50"], result["latency_s"]["p95"]) == (10, 13)
        assert result["cold_start_share"] == 0.25

    def test_burst_larger_than_max_workers(self) -> None:
        """5 jobs at once, max 2 workers, 10 s each: both start (3 s), run 2 + 2 + 1 jobs, ending at 13,
        23, 33; one idles 23-28, the other 33-38.  Billed 38 + 28 = 66 s; latencies 13,13,23,23,33."""
        result = simulate(endpoint(max_workers=2), [Job(0, 10)] * 5)
        assert result["billed_s"] == pytest.approx({"execution": 50, "idle": 10, "cold_start": 6, "rounding": 0,
                                                   "active": 0, "total": 66})
        assert (result["latency_s"]["p50"], result["latency_s"]["p95"]) == (23, 33)  # nearest rank: 3rd, 5th of 5
        assert result["queue_s"]["p95"] == 23  # the fifth job waits for a worker to finish
        assert (result["cold_start_share"], result["cold_starts"]) == (0.4, 2)

    def test_an_active_worker(self) -> None:
        """One active worker, jobs at 0, 100, 200 (10 s each): billed 0-210 s at the active price, no
        cold start, no flex worker.  With max 2 and two jobs at once, the second starts a flex worker."""
        result = simulate(endpoint(active_workers=1), every(100, 3, 10))
        assert result["billed_s"]["active"] == 210 and result["billed_s"]["total"] == 210
        assert result["usd_per_image"] == pytest.approx(210 * ACTIVE / 3)
        assert (result["latency_s"]["p95"], result["cold_start_share"], result["cold_starts"]) == (10, 0, 0)
        day = simulate(endpoint(active_workers=1), every(100, 3, 10), window_s=86400)  # the jobs are all of a day
        assert day["billed_s"]["active"] == 86400 and day["usd_per_image"] == pytest.approx(86400 * ACTIVE / 3)
        both = simulate(endpoint(active_workers=1, max_workers=2), [Job(0, 10)] * 2)
        # active 0-13 (the last job ends at 13) at the active price; flex 3 + 10 + 5 = 18 s at the flex price
        assert both["billed_s"] == pytest.approx({"execution": 10, "idle": 5, "cold_start": 3, "rounding": 0,
                                                 "active": 13, "total": 31})
        assert both["usd"]["total"] == pytest.approx(13 * ACTIVE + 18 * PRICE)
        assert sorted([both["latency_s"]["p50"], both["latency_s"]["p95"]]) == [10, 13]

    def test_concurrency_per_worker(self) -> None:
        """4 jobs at once, one worker taking 2 at a time: 3-13 and 13-23, idle to 28; busy 20 s."""
        result = simulate(endpoint(concurrency=2), [Job(0, 10)] * 4)
        assert result["billed_s"] == pytest.approx({"execution": 20, "idle": 5, "cold_start": 3, "rounding": 0,
                                                   "active": 0, "total": 28})
        assert (result["latency_s"]["p50"], result["latency_s"]["p95"]) == (13, 23)

    def test_bad_settings_name_the_option(self) -> None:
        with pytest.raises(ValueError, match=r"--active-workers: must be from 0 to max workers 1"):
            simulate(endpoint(active_workers=2), [Job(0, 1)])
        with pytest.raises(ValueError, match=r"--idle-timeout: must be a finite number of 0 or more"):
            simulate(endpoint(idle_timeout_s=-1), [Job(0, 1)])


def test_the_users_own_numbers() -> None:
    """The user's arithmetic, reproduced from the inputs that make it true, then what it misses.

    $0.0133 an image = 2 workers x 35 s x $0.00019/s: both workers billed for every second of every
    job while jobs run one at a time.  Inputs: price $0.00019/s (24 GB class), 2 workers always up
    (active workers 2, max 2) billed at the user's price (active discount 0), jobs arriving every
    35 s and taking 35 s.  Simulated: 2 x 3500 s for 100 images = $0.0133.
    $0.0049 an image = 1 worker x ~26 s x $0.00019/s ($0.00494): a 3-step job of 26 s, one worker
    always up, jobs back to back.
    What the hand arithmetic misses: the same 3-step jobs on a flex worker (max 1, idle timeout
    5 s, FlashBoot cold start 5 s) arriving one a minute bill 5 + 26 + 5 = 36 s each: $0.00684.
    """
    price = 0.00019
    two = simulate(Config("a5000", price, price, max_workers=2, active_workers=2), every(35, 100, 35))
    assert two["billed_s"]["active"] == 7000
    assert round(two["usd_per_image"], 4) == 0.0133
    one = simulate(Config("a5000", price, price, max_workers=1, active_workers=1), every(26, 100, 26))
    assert round(one["usd_per_image"], 4) == 0.0049 and one["usd_per_image"] == pytest.approx(26 * price)
    flex = simulate(Config("a5000", price, price, max_workers=1, idle_timeout_s=5, cold_start_s=5), every(60, 100, 26))
    assert flex["usd_per_image"] == pytest.approx(36 * price)
    assert flex["cold_start_share"] == 1.0


def benchmark_rows() -> dict[tuple[str, str], tuple[float, float]]:
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = text.split("## Cost per image by RunPod GPU class", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \| ([^|]+?) \| ~([0-9.]+) \|", section, re.M)
    return {(cls, settings): (float(price), float(seconds)) for cls, price, settings, seconds in rows}


class TestCatalog:
    def test_execution_figures_are_the_benchmarks_pages(self) -> None:
        rows = benchmark_rows()
        ours = {(g.runpod_class, g.settings): (g.flex_usd_s, g.job_s) for g in catalog.GPU_CLASSES.values() if g.job_s}
        assert ours == rows
        derived = "(derived)" in (ROOT / "docs" / "benchmarks.md").read_text().split("## Cost per image", 1)[1][:40]
        assert {g.job_source for g in catalog.GPU_CLASSES.values() if g.job_s} == {"derived" if derived else "measured"}

    def test_flops_are_the_real_graphs_in_the_client_and_the_docs(self) -> None:
        """The client's FLOPs come from the harness's table (real_graph_flops.json; tests/test_fakecuda.py re-measures
        it), and docs/benchmarks.md and docs/deploy.md print that table's figures, labelled as derived from it."""
        table = catalog.real_graph_flops()
        assert table["source"].startswith("derived from the real graph (python -m qwen_edit_worker.placement.flopst")
        assert catalog.job_tflop("edit-2511", 1.0, "denoise") == 169.31
        assert catalog.job_tflop() == 532.17
        with pytest.raises(ValueError, match="0.3 MP"):
            catalog.job_tflop("edit", 0.3)
        text = (ROOT / "docs" / "benchmarks.md").read_text()
        section = text.split("### The real graph's FLOPs (derived from the real graph)", 1)[1].split("\n## ", 1)[0]
        assert table["source"].split("(", 1)[1].rstrip(")") in " ".join(section.split())
        docs = {(v, float(mp)): (int(n.replace(",", "")), *map(float, rest)) for v, mp, n, *rest in
                re.findall(r"^\| (edit[-0-9]*) \| ([0-9.]+) \| ([0-9,]+) \| ([0-9.]+) \| [0-9.]+ \| ([0-9.]+) \| "
                           r"([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", section, re.M)}
        assert docs == {(r["variant"], r["megapixels"]): (
            r["tokens"], *(round(r["tflop"][p], 1) for p in ("denoise", "text", "encode", "decode")),
            float(round(r["job_tflop"]))) for r in table["rows"]}
        one_mp = f"{catalog.job_tflop('edit-2511', 1.0, 'denoise'):.1f}"
        cost = text.split("## Cost per image by RunPod GPU class", 1)[1][:300]
        assert f"3 passes x {one_mp}\nTFLOP (derived from the real graph" in cost
        deploy = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
        assert (f"derived from the real graph's FLOPs (3 x {one_mp} TFLOP a pass at 1 MP, {catalog.job_tflop():.0f} "
                "TFLOP a job") in deploy

    def test_flex_prices_are_the_workers_price_table(self) -> None:
        names = {"a4000": "RTX A4000", "a5000": "RTX A5000", "4090": "RTX 4090", "a6000": "RTX A6000",
                 "l40s": "L40S", "l40s-fp8": "L40S", "a100": "A100 80GB", "a5000-int8": "RTX A5000",
                 "4090-int8": "RTX 4090", "a6000-int8": "RTX A6000", "l40s-int8": "L40S", "a100-int8": "A100 80GB",
                 "h100": "H100 80GB HBM3",
                 "h100-fp8": "H100", "rtxpro6000": "RTX PRO 6000", "h200": "H200", "b200": "B200"}
        assert set(names) == set(catalog.GPU_CLASSES)
        for name, gpu in catalog.GPU_CLASSES.items():
            assert table_price(names[name]) == gpu.flex_usd_s, name
            assert 0.19 <= gpu.published_discount <= 0.33, name  # RunPod: "20-30%" (24 GB: 31.6%)


def test_poisson_arrivals_are_seeded() -> None:
    first, again, other = poisson(120, 2000, 1), poisson(120, 2000, 1), poisson(120, 2000, 2)
    assert first == again and first != other
    assert first[-1].at_s / 1999 == pytest.approx(30, rel=0.1)  # 120/h: a job every 30 s on average


class TestCommand:
    def test_grid_p95_json_and_plot(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        chart = tmp_path / "plan.png"
        assert main(["plan", "--rate", "60/h", "--jobs", "100", "--grid", "--gpu", "h100,a100,l40s-fp8",
                     "--p95", "20", "--json", "--plot", str(chart)]) == 0
        out = json.loads(capsys.readouterr().out)
        results = out["results"]
        assert len(results) == 3 * 4 * 4 * 2  # GPU classes x idle timeouts x max workers x active workers
        meeting = [r for r in results if r["latency_s"]["p95"] <= 20]
        assert out["recommended"] == min(meeting, key=lambda r: r["usd_per_image"])
        assert {r["execution_source"].split(",")[1].strip() for r in results} == {
            "derived (docs/benchmarks.md: bf16) from 532 TFLOP a 1 MP edit-2511 job",
            "derived (docs/benchmarks.md: fp8"}
        assert all(r["execution_source"].endswith(catalog.real_graph_flops()["source"]) for r in results)
        with Image.open(chart) as img:
            assert img.format == "PNG" and img.size[0] >= 800

    def test_the_cold_start_default_follows_the_bake(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--bake sets --cold-start's default: the bake's bytes at an NVMe's rate (assumed) x the ready/read ratio
        measured at real shape, plus the container's start (docs/deploy.md); --cold-start still wins."""
        used = {}
        for extra in (["--bake", "int8"], ["--bake", "fp8"], [], ["--bake", "int8", "--cold-start", "60"]):
            assert main(["plan", "--burst", "2", "--flashboot", "off", "--json", *extra]) == 0
            [result] = json.loads(capsys.readouterr().out)["results"]
            used[" ".join(extra)] = result["config"]["cold_start_s"]
        expected = {b: catalog.CONTAINER_START_S + catalog.READY_OVER_READ * catalog.IMAGE_BYTES[b] / 2e9
                    for b in catalog.BAKES}
        assert used["--bake int8"] == pytest.approx(expected["int8"], abs=0.05) == 23.1
        assert used["--bake fp8"] == used["--bake int8"] and used[""] == pytest.approx(expected["bf16"], abs=0.05)
        assert used[""] == catalog.COLD_START_S == 40.3 and used["--bake int8 --cold-start 60"] == 60

    def test_replayed_log(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Two jobs 100 s apart (2 s and 4 s), one that never reached a worker; 1 worker, idle 5 s,
        FlashBoot cold start 5 s, $0.001/s: 5 + 2 + 5 and 5 + 4 + 5 = 26 s for 2 images."""
        records = [{"submitted_at": "2026-11-22T10:00:00+00:00", "executionTime": 2000, "status": "COMPLETED"},
                   {"submitted_at": "2026-11-22T10:01:40+00:00", "timing": {"total_ms": 4000}, "status": "COMPLETED"},
                   {"submitted_at": "2026-11-22T10:02:00+00:00", "status": "ERROR", "error": "cannot reach"}]
        log = tmp_path / "edits.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert main(["plan", str(log), "--max-workers", "1", "--price", "0.001", "--flashboot-cold-start", "5"]) == 0
        printed = capsys.readouterr().out
        assert "2 jobs replayed from 1 log(s) (1 records that reached no worker left out)" in printed
        assert "0.01300" in printed and "RunPod executionTime: 1" in printed and "worker timing.total_ms: 1" in printed

    def test_unmet_target_and_bad_input(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["plan", "--burst", "20", "--max-workers", "1", "--p95", "2"]) == 1
        assert "no configuration meets p95 <= 2 s" in capsys.readouterr().out
        assert main(["plan", "--burst", "2", "--rate", "5/h"]) == 2
        assert "arrivals: give exactly one of" in capsys.readouterr().err
        assert main(["plan", "--burst", "2", "--gpu", "a5000"]) == 2
        assert "--gpu: a5000 (24 GB (L4, A5000, 3090)) has no execution figure" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exited:
            main(["plan", "--rate", "fast"])
        assert exited.value.code == 2
        assert "--rate: must be jobs per hour like 120/h" in capsys.readouterr().err
