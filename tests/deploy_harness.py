"""What the `qwen-edit deploy` tests share: the loopback fake of RunPod's REST API v2 with the real tiny worker
behind each endpoint's queue, and a runner that checks the API key appears nowhere in what was printed.

The fake's teardown checks that no request failed RunPod's schema and no answer of the fake did either.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from qwen_edit_client import runpod_api, smoke
from qwen_edit_client.cli import main
from qwen_edit_worker.serving.worker import Worker
from runpod_rest import GPUS, FakeRunPodApi

KEY = "rpa_DEPLOYTESTKEY0123456789abcdef"
IMAGE = "registry.example/you/qwen-image-edit:2511"


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.out.strip().splitlines()[-1])

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture(name="api")
def api_fixture(worker_for: Callable[..., Worker], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRunPodApi]:
    def worker(env: dict[str, str]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        settings = {k: v for k, v in env.items() if k != "MODEL_VARIANT"}
        return worker_for(env.get("MODEL_VARIANT", "edit-2511"), **settings).handle

    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.setattr(runpod_api, "BACKOFF_S", 0.01)
    monkeypatch.setattr(smoke, "POLL_S", 0.05)
    with FakeRunPodApi(worker, key=KEY) as fake:
        monkeypatch.setenv("RUNPOD_API_URL", fake.url)
        yield fake
    assert not fake.invalid, fake.invalid  # every body the client sent passed RunPod's schema
    assert not fake.bad_answers, fake.bad_answers  # and every answer the fake gave did too


@pytest.fixture(name="run")
def run_fixture(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    def deploy(*args: str) -> Ran:
        code = main(["deploy", *args])
        captured = capsys.readouterr()
        ran = Ran(code, captured.out, captured.err)
        assert KEY not in ran.text  # the key is never printed, on any path
        return ran
    return deploy


def sent(api: FakeRunPodApi, method: str) -> list[tuple[str, Any]]:
    return [(path, body) for m, path, body in api.bodies if m == method]


def per_second(pools: list[str]) -> dict[str, float]:
    return {gpu: round(hourly / 3600, 8) for gpu, _, pool, _, hourly in GPUS if pool in pools and hourly}
