"""Under load: the SDK's local HTTP API with the tiny model answers concurrent clients, every job
with its own seed and its own picture, and the server's memory stays flat across jobs.

Measured on the 2-core development machine (2026-11-22): resident memory went from 1078 MB after
16 jobs to 1063 MB after 48 more (64x64 jobs, 4 clients), so no growth; the bound asserted below is
64 MB, to catch a leak of a picture or a tensor per job (each would add megabytes over 48 jobs)
without flaking on allocator noise.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from api_server import serve_api
from conftest import small_job

CLIENTS = 4
SEEDS = [101, 202, 303, 404, 505, 606, 707, 808]
ROUNDS = 6  # 48 concurrent jobs after the 16 reference and warm-up jobs
LEAK_BOUND_MB = 64


def run(url: str, seed: int) -> tuple[int, np.ndarray]:
    body = requests.post(f"{url}/runsync", json=small_job(seed=seed), timeout=120).json()
    assert body.get("status") == "COMPLETED", body
    item = body["output"]["images"][0]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"]))).convert("RGB"))
    assert item["seed"] == body["output"]["seed"] == seed
    return seed, pixels


@pytest.mark.timeout(600)
def test_concurrent_clients_get_their_own_results_and_memory_stays_flat(tmp_path: Path) -> None:
    with serve_api(tmp_path) as api:
        reference = dict(run(api.url, seed) for seed in SEEDS)
        for seed in SEEDS:  # warm-up: allocator pools and caches settle
            run(api.url, seed)
        process = psutil.Process(api.process.pid)
        before = process.memory_info().rss
        jobs = [SEEDS[(i * 3) % len(SEEDS)] for i in range(ROUNDS * len(SEEDS))]
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda s: run(api.url, s), jobs))
        after = process.memory_info().rss
        log = api.log.read_text()
    assert [seed for seed, _ in results] == jobs
    for seed, pixels in results:
        assert np.array_equal(pixels, reference[seed]), f"seed {seed} got another job's picture"
    growth_mb = (after - before) / 2**20
    print(f"RSS before {before / 2**20:.0f} MB, after {len(jobs)} jobs {after / 2**20:.0f} MB "
          f"(growth {growth_mb:.1f} MB)")
    assert growth_mb < LEAK_BOUND_MB
    assert small_job()["input"]["image"][20:80] not in log  # the server log holds no input base64
