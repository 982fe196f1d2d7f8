"""`qwen-edit`: edits through a RunPod-speaking server (status progression, retries, 401/404/FAILED),
through the worker's own local HTTP API, and the cost report checked against known numbers."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from api_server import free_port, serve_api
from conftest import encode_picture, picture
from fake_runpod import DELAY_MS, EXECUTION_MS, FakeRunPod
from qwen_edit_client.cli import main
from qwen_edit_client.endpoint import EndpointClient, EndpointError
from qwen_edit_client.plan import from_logs
from qwen_edit_client.report import cost_report, edit_summary, format_edit_summary, format_report, read_logs
from qwen_edit_worker.serving.worker import Worker

KEY = "rpa_test_key"


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for index, (w, h) in enumerate([(96, 64), (64, 96), (80, 80)]):
        (folder / f"photo{index}.png").write_bytes(encode_picture(picture(w, h, seed=index)))
    (folder / "notes.txt").write_text("not a picture")
    return folder


@pytest.fixture
def fake(worker_for: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRunPod]:
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.delenv("RUNPOD_ENDPOINT_ID", raising=False)
    with FakeRunPod(worker_for("edit-2511").handle, key=KEY) as server:
        yield server


def edit(fake: FakeRunPod, out: Path, *args: str, endpoint: str = "ep-test") -> int:
    return main(["edit", *args, "--prompt", "make it red", "--megapixels", "0.0625", "--seed", "5",
                 "--output", str(out), "--base-url", f"{fake.url}/{endpoint}"])


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_through_run_and_status(fake: FakeRunPod, pictures: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "edits"
    assert main(["edit", str(pictures), "--prompt", "make it red", "--megapixels", "0.0625", "--seed", "5",
                 "--output", str(out), "--concurrency", "2", "--base-url", f"{fake.url}/ep-test"]) == 0
    saved = sorted(p.name for p in out.glob("*.png"))
    assert saved == ["photo0-seed5.png", "photo1-seed5.png", "photo2-seed5.png"]
    assert Image.open(out / "photo1-seed5.png").size == (208, 320)  # photo1 is 2:3, 0.0625 MP
    assert {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"} <= set(fake.statuses)
    assert fake.max_in_flight <= 2
    records = lines(out / "edits.jsonl")
    assert len(records) == 3 and {r["status"] for r in records} == {"COMPLETED"}
    record = next(r for r in records if r["inputs"][0]["name"].endswith("photo0.png"))
    assert record["inputs"][0]["bytes"] == (pictures / "photo0.png").stat().st_size
    assert record["settings"] == {"prompt": "make it red", "seed": 5, "megapixels": 0.0625}
    assert (record["delayTime"], record["executionTime"]) == (DELAY_MS, EXECUTION_MS)
    assert record["timing"]["steps"] == 3 and record["cost"]["price_source"] == "unknown"
    assert record["job_id"].startswith("job-") and record["outputs"] == [str(out / "photo0-seed5.png")]
    assert fake.auth_headers == {f"Bearer {KEY}"}
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err + (out / "edits.jsonl").read_text()


def test_retries_on_429_and_5xx(fake: FakeRunPod, pictures: Path, tmp_path: Path) -> None:
    fake.inject = {"run": [429, 502], "status": [500]}
    assert edit(fake, tmp_path / "out2", str(pictures / "photo0.png")) == 0
    answered = [(m, r, s) for m, r, s in fake.seen if r in ("run", "status")]
    assert ("POST", "run", 429) in answered and ("POST", "run", 502) in answered and ("GET", "status", 500) in answered
    assert (tmp_path / "out2" / "photo0-seed5.png").is_file()


def test_sync_uses_runsync(fake: FakeRunPod, pictures: Path, tmp_path: Path) -> None:
    assert edit(fake, tmp_path / "out", str(pictures / "photo2.png"), "--sync") == 0
    assert [r for _, r, _ in fake.seen] == ["runsync"]


def test_unauthorized(fake: FakeRunPod, pictures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_wrong_key")
    assert edit(fake, tmp_path / "out", str(pictures / "photo0.png")) == 2
    err = capsys.readouterr().err
    assert "401 Unauthorized" in err and "RUNPOD_API_KEY" in err and "rpa_wrong_key" not in err


def test_unknown_endpoint(fake: FakeRunPod, pictures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert edit(fake, tmp_path / "out", str(pictures / "photo0.png"), endpoint="nope") == 2
    assert "404 Not Found" in capsys.readouterr().err


def test_failed_job_shows_the_workers_error(fake: FakeRunPod, pictures: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["edit", str(pictures / "photo0.png"), "--prompt", "x", "--num-images", "9", "--output", str(out),
                 "--base-url", f"{fake.url}/ep-test"])
    assert code == 1
    assert "FAILED: input.num_images: must be a whole number from 1 to 4" in capsys.readouterr().err
    [record] = lines(out / "edits.jsonl")
    assert record["status"] == "FAILED" and record["executionTime"] == EXECUTION_MS


def test_against_the_workers_local_http_api(tmp_path: Path, pictures: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: the local API's records have no RunPod executionTime/delayTime, and `qwen-edit cost`
    (and --plot) on such a log exited 2 with "zip() argument 2 is longer than argument 1".  Now every
    log it writes gives a report, with the worker's own timing and the figures' sources named."""
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with serve_api(tmp_path) as api:
        for mode in ([], ["--sync"]):
            out = tmp_path / f"out{len(mode)}"
            assert main(["edit", str(pictures / "photo0.png"), "--prompt", "make it red", "--megapixels", "0.0625",
                         "--seed", "9", "--output", str(out), "--base-url", api.url, *mode]) == 0
            pixels = np.asarray(Image.open(out / "photo0-seed9.png"))
            assert pixels.shape == (208, 320, 3)  # photo0 is 3:2; 0.0625 MP at 3:2
            [record] = lines(out / "edits.jsonl")
            assert record["status"] == "COMPLETED" and record["timing"]["steps"] == 3
            assert record["executionTime"] is None and record["delayTime"] is None  # what the local API gives
    capsys.readouterr()
    for mode in (0, 1):
        log, chart = tmp_path / f"out{mode}" / "edits.jsonl", tmp_path / f"cost{mode}.png"
        assert main(["cost", str(log), "--plot", str(chart)]) == 0
        printed = capsys.readouterr().out
        assert "worker timing.total_ms: 1" in printed and "client clock (round trip - execution): 1" in printed
        assert "(no GPU price in the logs: pass --price)" in printed  # a CPU worker has no price
        with Image.open(chart) as img:
            assert img.format == "PNG"
        assert main(["cost", str(log), "--json", "--price", "0.001", "--idle-timeout", "0"]) == 0
        report = json.loads(capsys.readouterr().out)
        [record] = lines(log)
        execution = record["timing"]["total_ms"] / 1000
        assert report["execution_s"]["mean"] == pytest.approx(execution)
        assert report["sources"]["execution_s"] == {"worker timing.total_ms": 1}
        assert report["sources"]["usd_per_image"] == {"execution x price": 1}
        assert report["usd_per_image"]["mean"] == pytest.approx(execution * 0.001)
        cold_s = report["delay_s"]["mean"] if record["timing"]["cold_start"] else 0.0  # the client-clock delay
        assert report["billed_s"]["cold_start"] == pytest.approx(cold_s)
        assert report["usd_per_image_all_in"] == pytest.approx((execution + cold_s) * 0.001)  # idle timeout 0


KNOWN = [  # four jobs with hand-checkable numbers (see test_cost_report_known_numbers)
    {"status": "COMPLETED", "submitted_at": "2026-11-22T10:00:00+00:00", "finished_at": "2026-11-22T10:00:03+00:00",
     "executionTime": 2000, "delayTime": 1000, "timing": {"cold_start": True}, "outputs": ["a.png"],
     "cost": {"usd_per_image": 0.002, "usd_per_second": 0.001}},
    {"status": "COMPLETED", "submitted_at": "2026-11-22T10:00:05+00:00", "finished_at": "2026-11-22T10:00:06+00:00",
     "executionTime": 1000, "delayTime": 100, "timing": {"cold_start": False}, "outputs": ["b.png"],
     "cost": {"usd_per_image": 0.001, "usd_per_second": 0.001}},
    {"status": "COMPLETED", "submitted_at": "2026-11-22T10:01:00+00:00", "finished_at": "2026-11-22T10:01:02+00:00",
     "executionTime": 1500, "delayTime": 200, "timing": {"cold_start": False}, "outputs": ["c0.png", "c1.png"],
     "cost": {"usd_per_image": 0.00075, "usd_per_second": 0.001}},
    {"status": "FAILED", "submitted_at": "2026-11-22T10:02:00+00:00", "finished_at": "2026-11-22T10:02:01+00:00",
     "executionTime": 500, "delayTime": 50, "error": "input.seed: ..."},
]


def test_cost_report_known_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in KNOWN[:2]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in KNOWN[2:]))
    report = cost_report(read_logs([log, tmp_path / "b.jsonl"]), idle_timeout_s=5)
    assert (report["jobs"], report["completed"], report["failed"], report["images"]) == (4, 3, 1, 4)
    assert report["usd_per_image"] == pytest.approx({"mean": 0.00125, "p50": 0.001, "p95": 0.002})
    assert report["execution_s"] == pytest.approx({"mean": 1.25, "p50": 1.0, "p95": 2.0})
    assert report["delay_s"] == pytest.approx({"mean": 0.3375, "p50": 0.1, "p95": 1.0})
    assert report["cold_start_share"] == 0.25
    # idle: 2 s (next job 2 s later), 5, 5 (gaps over the timeout), 5 (last job); cold start: 1 s
    assert report["billed_s"] == pytest.approx({"execution": 5.0, "idle": 17.0, "cold_start": 1.0, "total": 23.0})
    assert report["usd_per_image_all_in"] == pytest.approx(23 * 0.001 / 4)
    plot_path = tmp_path / "cost.png"
    assert main(["cost", str(log), str(tmp_path / "b.jsonl"), "--idle-timeout", "5", "--plot", str(plot_path)]) == 0
    printed = capsys.readouterr().out
    assert "cold starts" in printed and "25.0%" in printed and "0.00575" in printed
    with Image.open(plot_path) as img:
        assert img.format == "PNG" and img.size[0] > 400
    assert main(["cost", str(log), "--json", "--idle-timeout", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["billed_s"]["idle"] == 0


def test_edit_prints_each_cost_as_it_finishes_and_a_summary(fake: FakeRunPod, pictures: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The fake endpoint's worker runs on a CPU (no GPU price), so --price gives the cost:
    executionTime 2.345 s x $0.002/s = $0.00469 per image; three images, $0.01407 in all."""
    out = tmp_path / "out"
    assert main(["edit", str(pictures), "--prompt", "x", "--megapixels", "0.0625", "--seed", "5", "--output", str(out),
                 "--base-url", f"{fake.url}/ep-test", "--concurrency", "1", "--price", "0.002"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" -> ")[0].rsplit("/", 1)[1] for line in printed[:3]] == ["photo0.png", "photo1.png",
                                                                                  "photo2.png"]
    assert all(line.endswith("$0.00469 per image (execution x price)") for line in printed[:3])
    assert printed[3] == "3 images, total $0.01407, per image mean $0.00469 p95 $0.00469, 0 failed"
    assert main(["edit", str(pictures / "photo0.png"), "--prompt", "x", "--output", str(out),
                 "--base-url", f"{fake.url}/ep-test", "--num-images", "9"]) == 1
    printed = capsys.readouterr()
    assert "FAILED: input.num_images" in printed.err
    assert printed.out.strip() == "0 images, total $n/a, per image mean $n/a p95 $n/a, 1 failed"


def test_retries_give_up_with_a_plain_message(fake: FakeRunPod) -> None:
    fake.inject = {"run": [503] * 4}
    client = EndpointClient(f"{fake.url}/ep-test", KEY, retries=2, backoff_s=0.01)
    with pytest.raises(EndpointError, match=r"/run answered HTTP 503; gave up after 3 attempts"):
        client.submit({"input": {}})
    assert [s for _, r, s in fake.seen if r == "run"] == [503, 503, 503]
    unreachable = EndpointClient(f"http://127.0.0.1:{free_port()}", None, retries=1, backoff_s=0.01)
    with pytest.raises(EndpointError, match=r"cannot reach http://127.0.0.1:\d+ \(ConnectionError\); gave up after 2"):
        unreachable.submit({"input": {}})


STAMP = st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2026, 12, 31),
                     timezones=st.just(dt.UTC)).map(lambda t: t.isoformat(timespec="milliseconds"))
MS = st.none() | st.integers(0, 10**6)
RECORD = st.fixed_dictionaries({
    "status": st.sampled_from(["COMPLETED", "FAILED", "ERROR", "CANCELLED", "TIMED_OUT", "IN_PROGRESS"]),
    "inputs": st.just([{"name": "a.png", "bytes": 10}]),
}, optional={
    "submitted_at": STAMP, "finished_at": STAMP, "executionTime": MS, "delayTime": MS,
    "timing": st.none() | st.fixed_dictionaries({}, optional={
        "total_ms": st.floats(0, 1e6), "cold_start": st.booleans(), "load_ms": st.floats(0, 1e6)}),
    "cost": st.none() | st.fixed_dictionaries({}, optional={"usd_per_image": st.none() | st.floats(0, 1),
                                                          "usd_per_second": st.none() | st.floats(0, 0.01)}),
    "outputs": st.lists(st.just("x.png"), max_size=4), "settings": st.just({"prompt": "x"}),
    "error": st.text(max_size=20),
})


@settings(max_examples=150, deadline=None)
@given(records=st.lists(RECORD, max_size=8), price=st.none() | st.floats(0, 0.01), idle=st.floats(0, 600))
def test_every_log_shape_the_client_writes_gives_a_report(records: list[dict[str, Any]], price: float | None,
                                                          idle: float) -> None:
    """Whatever fields a record carries or lacks (RunPod's API, a worker's local API, a request that
    never reached a worker), the report, the edit summary and the planner's replay answer."""
    report = cost_report(read_logs_from(records), idle, price)
    assert format_report(report) and json.dumps(report)
    assert report["jobs"] == len(records)
    assert format_edit_summary(edit_summary(records, price))
    try:
        arrivals, left_out = from_logs(records)
    except ValueError as err:
        assert str(err).startswith("LOG: no job in the logs reached a worker")
    else:
        assert len(arrivals) + left_out == len(records) and arrivals[0].at_s == 0


def read_logs_from(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: r.get("finished_at") or r.get("submitted_at") or "")


def test_cost_plot_of_a_log_with_no_finished_job(tmp_path: Path) -> None:
    log = tmp_path / "edits.jsonl"
    log.write_text(json.dumps({"status": "ERROR", "error": "cannot reach", "submitted_at": "2026-11-22T10:00:00+00:00"})
                   + "\n")
    assert main(["cost", str(log), "--plot", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG"
