"""The three ways people run handler.py, as real processes: a local job from test_input.json,
`--test_input '<json>'`, and the SDK's local HTTP API answering a real POST /runsync."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from api_server import serve_api, worker_env
from conftest import small_job

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handler.py"


def run(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HANDLER), *args], cwd=cwd, env=worker_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_import_loads_no_model() -> None:
    code = ("import sys, handler; assert handler._worker is None; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=worker_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_local_run_of_test_input_json_writes_the_picture(tmp_path: Path) -> None:
    (tmp_path / "test_input.json").write_text((ROOT / "test_input.json").read_text())
    out = run([], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    [item] = result["images"]
    picture = tmp_path / item["file"]
    assert picture.is_file() and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "image" not in item and result["timing"]["steps"] == 3
    assert result["image_url"] == item["file"]  # not the data URI: no picture data is printed
    source = json.loads((ROOT / "test_input.json").read_text())["input"]["image"]
    assert source[-60:] not in out.stdout + out.stderr  # the input's base64 is never printed or logged


def test_test_input_flag_and_failure_exit_code(tmp_path: Path) -> None:
    job = small_job(output_format="webp")
    out = run(["--test_input", json.dumps(job), "--output_dir", "edits"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "edits" / "test-job-0.webp").is_file()
    bad = run(["--test_input", json.dumps(small_job(num_images=9))], tmp_path)
    assert bad.returncode == 1 and "input.num_images: must be a whole number from 1 to 4" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_api(tmp_path_factory.mktemp("api")) as server:
        yield server.url


def test_http_runsync(api: str) -> None:
    response = requests.post(f"{api}/runsync", json=small_job(seed=3), timeout=120)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED", body
    output = body["output"]
    assert output["seed"] == 3 and output["images"][0]["width"] == 64 and output["timing"]["steps"] == 3


def test_http_error_is_the_job_error(api: str) -> None:
    body = requests.post(f"{api}/runsync", json=small_job(megapixels=9, width=None, height=None),
                         timeout=60).json()
    assert body["status"] == "FAILED"
    assert body["error"].startswith("input.megapixels: must be a number from 0.0625 to 2")


def test_http_run_then_status(api: str) -> None:
    job_id = requests.post(f"{api}/run", json=small_job(), timeout=30).json()["id"]
    deadline = time.monotonic() + 60
    body: dict = {}
    while time.monotonic() < deadline:
        body = requests.post(f"{api}/status/{job_id}", timeout=30).json()
        if body.get("status") in ("COMPLETED", "FAILED"):
            break
        time.sleep(0.2)
    assert body.get("status") == "COMPLETED", body
    assert body["output"]["images"][0]["format"] == "png"
