"""Pure arithmetic: output sizes, cost per job and per image, and stage timing."""

from __future__ import annotations

import pytest

from qwen_edit_worker.accounting.cost import PRICE_TABLE, job_cost, table_price
from qwen_edit_worker.accounting.timing import STAGES, StageClock, timing_report
from qwen_edit_worker.pictures.sizing import output_size, working_area


class TestOutputSize:
    @pytest.mark.parametrize(("aspect", "mp", "expected"), [
        (1.0, 1.0, (1024, 1024)), (1.0, 0.0625, (256, 256)), (4 / 3, 0.0625, (288, 224)),
        (16 / 9, 1.0, (1360, 768)), (1.0, 2.0, (1456, 1456)),
    ])
    def test_area_and_aspect(self, aspect: float, mp: float, expected: tuple[int, int]) -> None:
        assert output_size(aspect, mp) == expected

    @pytest.mark.parametrize("aspect", [0.05, 0.3, 1.0, 2.5, 20.0])
    @pytest.mark.parametrize("mp", [0.0625, 0.5, 1.0, 2.0])
    def test_bounds_and_multiples(self, aspect: float, mp: float) -> None:
        width, height = output_size(aspect, mp)
        assert width % 16 == 0 and height % 16 == 0
        assert 64 <= width <= 2048 and 64 <= height <= 2048


def test_working_area() -> None:
    assert working_area((64, 128), 1.0) == 64 * 128  # explicit size wins
    assert working_area(None, 0.25) == 512 * 512


class TestCost:
    def test_env_price_wins(self) -> None:
        cost = job_cost(2.0, 4, "NVIDIA H100 80GB HBM3", 0.001)
        assert cost == {"gpu": "NVIDIA H100 80GB HBM3", "usd_per_second": 0.001, "price_source": "env",
                        "seconds": 2.0, "usd": 0.002, "usd_per_image": 0.0005}

    @pytest.mark.parametrize(("name", "price"), [
        ("NVIDIA H100 80GB HBM3", 0.00116), ("NVIDIA H100 NVL", 0.00116), ("NVIDIA H200", 0.00155),
        ("NVIDIA A100-SXM4-80GB", 0.00076), ("NVIDIA L40S", 0.00053), ("NVIDIA RTX 6000 Ada Generation", 0.00053),
        ("NVIDIA RTX A6000", 0.00034), ("NVIDIA GeForce RTX 4090", 0.00031), ("NVIDIA L4", 0.00019),
        ("NVIDIA RTX A4000", 0.00016), ("NVIDIA B200", 0.00240),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", 0.00111),
    ])
    def test_table(self, name: str, price: float) -> None:
        assert table_price(name) == price
        cost = job_cost(1.5, 1, name, None)
        assert cost["price_source"] == "table" and cost["usd"] == round(1.5 * price, 7) == cost["usd_per_image"]

    def test_gpu_prices_price_this_gpu_before_the_table(self) -> None:
        """GPU_PRICES (the live catalog, by the catalog's GPU type id) wins over the table; GPU_PRICE_PER_SECOND
        over both.  An endpoint spans pools of different prices (AMPERE_24 $0.00019/s, ADA_24 $0.00031/s): each
        GPU finds its own."""
        prices = {"NVIDIA GeForce RTX 4090": 0.0003, "NVIDIA RTX A5000": 0.0002}
        cost = job_cost(2.0, 2, "NVIDIA GeForce RTX 4090", None, prices)
        assert cost == {"gpu": "NVIDIA GeForce RTX 4090", "usd_per_second": 0.0003, "price_source": "gpu_prices",
                        "seconds": 2.0, "usd": 0.0006, "usd_per_image": 0.0003}
        assert job_cost(1.0, 1, "nvidia rtx a5000 ", None, prices)["usd_per_second"] == 0.0002  # case, spaces
        assert job_cost(1.0, 1, "NVIDIA GeForce RTX 4090", 0.001, prices)["price_source"] == "env"
        table = job_cost(1.0, 1, "NVIDIA L4", None, prices)  # not listed: the built-in table
        assert table["price_source"] == "table" and table["usd_per_second"] == 0.00019
        assert job_cost(1.0, 1, "NVIDIA GeForce RTX 40", None, prices)["price_source"] == "unknown"  # whole names
        assert job_cost(1.0, 1, None, None, prices)["price_source"] == "unknown"  # a CPU: no GPU name

    def test_unknown_gpu_and_cpu(self) -> None:
        for name in (None, "Tesla K80"):
            cost = job_cost(3.0, 2, name, None)
            assert cost["price_source"] == "unknown" and cost["usd"] is None and cost["usd_per_image"] is None
            assert cost["usd_per_second"] is None and cost["seconds"] == 3.0

    def test_table_prices_are_per_second(self) -> None:
        assert all(0 < price < 0.01 for _, price in PRICE_TABLE)


class TestTiming:
    def test_stages_accumulate_and_sum_below_total(self) -> None:
        clock = StageClock()
        with clock.stage("inputs"):
            sum(range(10000))
        with clock.stage("text_encode"):
            sum(range(10000))
        with clock.stage("text_encode"):
            sum(range(10000))
        report = timing_report(clock, cold_start=False, load_seconds=0.0, steps=3)
        assert set(report) == {"cold_start", "load_ms", "gpu_ms", "total_ms", "steps", "ms_per_step"} | {
            f"{s}_ms" for s in STAGES}
        stage_sum = sum(report[f"{s}_ms"] for s in STAGES)
        assert 0 < stage_sum <= report["total_ms"]
        assert report["text_encode_ms"] > 0 and report["denoise_ms"] == 0.0

    def test_sync_runs_at_every_reading(self) -> None:
        calls = []
        clock = StageClock(sync=lambda: calls.append(1))
        with clock.stage("decode"):
            pass
        clock.mark("x")
        assert len(calls) == 4  # start, stage begin, stage end, mark
