"""ENDPOINT_TYPE=lb: `python handler.py` as a RunPod load-balancing endpoint, called by real clients.

The worker runs as a subprocess on loopback exactly as the image's CMD runs it (tiny model); the
clients are the real `openai` package (`client.images.edit`), curl's multipart, and `requests` for
/runsync and raw forms.  What must hold: /ping says 204 while loading and 200 when ready (on
PORT_HEALTH and PORT); edits answer OpenAI's ImagesResponse; every bad field gets OpenAI's error
shape naming the field the caller sent; a burst past CONCURRENCY + LB_MAX_WAITING gets 429s while
every admitted request gets its pictures; API_KEY guards every route but /ping; a bad setting or a
model that cannot load leaves a live worker whose /ping answers 503 with the reason.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from PIL import Image

from conftest import encode_picture, picture
from lb_server import LbWorker, serve_lb

KEY = "test-key-123"
START_TIMEOUT = 240
CALL_TIMEOUT = 240
SMALL = {"size": "64x64"}


def png(seed: int = 0) -> bytes:
    return encode_picture(picture(96, 64, seed))


@pytest.fixture(scope="module")
def lb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LbWorker]:
    """One tiny load-balancing worker (edit-2511, CONCURRENCY=2, LB_MAX_WAITING=1, API_KEY set), shared."""
    log = tmp_path_factory.mktemp("lb") / "worker.log"
    with serve_lb(log, CONCURRENCY="2", LB_MAX_WAITING="1", API_KEY=KEY, MODEL_VARIANT="edit-2511") as worker:
        worker.wait_ping((200, 503), START_TIMEOUT)
        yield worker


@pytest.fixture(scope="module")
def client(lb: LbWorker) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lb.url}/v1", api_key=KEY, timeout=CALL_TIMEOUT, max_retries=0)


def form_post(lb: LbWorker, fields: dict[str, str], files: list[tuple[str, bytes]] | None = None,
              key: str | None = KEY) -> requests.Response:
    """A raw multipart POST to /v1/images/edits (fields as text, files as (field name, bytes))."""
    parts = [(name, (f"{i}.png", data, "image/png")) for i, (name, data) in enumerate(files or [])]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{lb.url}/v1/images/edits", data=fields, files=parts or None, headers=headers,
                         timeout=CALL_TIMEOUT)


def assert_openai_error(response: requests.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert "Traceback" not in error["message"]
    return error


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


class TestHealth:
    def test_ping_went_204_while_loading_then_200_on_both_ports(self, lb: LbWorker) -> None:
        seen = [s for s in lb.pings if s != 0]  # 0: not listening yet
        assert seen[0] == 204 and seen[-1] == 200 and set(seen) == {204, 200}, (lb.pings, lb.log_tail())
        assert lb.health_url != lb.url
        for base in (lb.health_url, lb.url):
            assert requests.get(f"{base}/ping", timeout=10).status_code == 200  # no API key needed

    def test_models_lists_the_one_model(self, client: openai.OpenAI) -> None:
        assert [m.id for m in client.models.list().data] == ["Qwen/Qwen-Image-Edit-2511"]


class TestEdits:
    def test_one_picture_with_the_openai_sdk(self, client: openai.OpenAI) -> None:
        answer = client.images.edit(image=("in.png", png(), "image/png"), prompt="make it a sunset", size="64x64",
                                    model="Qwen/Qwen-Image-Edit-2511", output_format="webp", output_compression=80,
                                    extra_body={"seed": 2**40 + 11, "num_inference_steps": 2, "negative_prompt": " "})
        assert len(answer.data) == 1 and answer.data[0].url is None
        out = decoded(answer.data[0].b64_json or "")
        assert out.format == "WEBP" and out.size == (64, 64)
        extra = answer.model_extra or {}
        assert answer.size == "64x64" and answer.output_format == "webp" and extra["seed"] == 2**40 + 11  # as sent
        assert extra["timing"]["steps"] == 2 and extra["timing"]["gpu_ms"] > 0 and "usd" in extra["cost"]

    def test_three_pictures_as_image_array_and_n_2(self, client: openai.OpenAI) -> None:
        images = [(f"{i}.png", png(i), "image/png") for i in range(3)]
        answer = client.images.edit(image=images, prompt="put them together", n=2, size="64x64",
                                    extra_body={"seed": 3})
        assert len(answer.data) == 2
        first, second = (decoded(d.b64_json or "") for d in answer.data)
        assert first.format == second.format == "PNG" and first.tobytes() != second.tobytes()

    def test_curl_multipart_with_image_array(self, lb: LbWorker, tmp_path: Path) -> None:
        curl = shutil.which("curl")
        if curl is None:
            pytest.fail("curl is not installed")
        for i in range(2):
            (tmp_path / f"{i}.png").write_bytes(png(i))
        result = subprocess.run(
            [curl, "-sS", "-H", f"Authorization: Bearer {KEY}", "-F", f"image[]=@{tmp_path / '0.png'}",
             "-F", f"image[]=@{tmp_path / '1.png'}", "-F", "prompt=swap the colours", "-F", "size=64x64",
             "-F", "output_format=jpeg", "-F", "loras=[]", "-w", "\n%{http_code}", f"{lb.url}/v1/images/edits"],
            capture_output=True, text=True, timeout=CALL_TIMEOUT, check=True)
        body, status = result.stdout.rsplit("\n", 1)
        assert status == "200", body
        answer = json.loads(body)
        assert decoded(answer["data"][0]["b64_json"]).format == "JPEG" and answer["created"] > 0

    def test_runsync_answers_like_the_queue_endpoint(self, lb: LbWorker) -> None:
        job = {"prompt": "x", "image": base64.b64encode(png()).decode(), "width": 64, "height": 64, "seed": 5}
        auth = {"Authorization": f"Bearer {KEY}"}
        done = requests.post(f"{lb.url}/runsync", json={"input": job}, headers=auth, timeout=CALL_TIMEOUT).json()
        assert done["status"] == "COMPLETED" and done["id"] and done["output"]["seed"] == 5
        assert done["output"]["images"][0]["type"] == "base64" and done["executionTime"] > 0
        failed = requests.post(f"{lb.url}/runsync", json={"input": {**job, "seed": -5}}, headers=auth,
                               timeout=CALL_TIMEOUT).json()
        assert failed["status"] == "FAILED" and failed["error"].startswith("input.seed: must be a whole number")


BAD_FIELDS = [  # (form fields, files, param named in the error)
    ({"prompt": "x", "n": "9"}, 1, "n"),
    ({"prompt": "x", "n": "two"}, 1, "n"),
    ({"prompt": "x", "size": "big"}, 1, "size"),
    ({"prompt": "x", "size": "100x64"}, 1, "size"),
    ({"prompt": "x", "output_format": "gif"}, 1, "output_format"),
    ({"prompt": "x", "output_compression": "200"}, 1, "output_compression"),
    ({"prompt": "x", "seed": "abc"}, 1, "seed"),
    ({"prompt": "x", "num_inference_steps": "0"}, 1, "num_inference_steps"),
    ({"prompt": "x", "model": "dall-e-2"}, 1, "model"),
    ({"prompt": "x", "response_format": "url"}, 1, "response_format"),
    ({"prompt": "x", "loras": "not json"}, 1, "loras"),
    ({"prompt": "x", "stream": "true"}, 1, "stream"),
    ({"prompt": "x", "quality": "high"}, 1, "quality"),
    ({"prompt": ""}, 1, "prompt"),
    ({}, 1, "prompt"),
    ({"prompt": "x"}, 0, "image"),
    ({"prompt": "x"}, 4, "image"),
]


class TestErrors:
    @pytest.mark.parametrize(("fields", "files", "param"), BAD_FIELDS)
    def test_bad_field_is_a_400_naming_it(self, lb: LbWorker, fields: dict[str, str], files: int,
                                          param: str) -> None:
        pictures = [("image" if files == 1 else "image[]", png(i)) for i in range(files)]
        assert_openai_error(form_post(lb, {**SMALL, **fields}, pictures), 400, param)

    def test_the_sdk_raises_its_own_error_classes(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.edit(image=("a.png", png(), "image/png"), prompt="x", n=5, size="64x64")
        assert bad.value.body == {"message": "n: must be a whole number from 1 to 4 (got 5)",
                                  "type": "invalid_request_error", "param": "n", "code": None}
        with pytest.raises(openai.BadRequestError) as generations:
            client.images.generate(prompt="a cat")
        assert "needs an input image" in str(generations.value) and generations.value.body["param"] == "image"

    def test_not_a_picture_names_the_file(self, lb: LbWorker) -> None:
        error = assert_openai_error(form_post(lb, {"prompt": "x"}, [("image[]", png()), ("image[]", b"nope")]),
                                    400, "image[1]")
        assert "image" in error["message"]

    def test_body_over_30_mb_is_413(self, lb: LbWorker) -> None:
        response = form_post(lb, {"prompt": "x"}, [("image", b"\0" * 31_000_000)])
        assert assert_openai_error(response, 413, None)["code"] == "request_too_large"

    def test_json_body_and_unknown_route(self, lb: LbWorker) -> None:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert_openai_error(requests.post(f"{lb.url}/v1/images/edits", json={"prompt": "x"}, headers=auth,
                                          timeout=30), 400, None)
        assert_openai_error(requests.post(f"{lb.url}/runsync", data="{", headers=auth, timeout=30), 400, None)
        missing = assert_openai_error(requests.get(f"{lb.url}/v2/nothing", headers=auth, timeout=30), 404, None)
        assert "GET /v2/nothing" in missing["message"]

    def test_bad_or_missing_api_key_is_refused(self, lb: LbWorker) -> None:
        for key in ("wrong", None):
            error = assert_openai_error(form_post(lb, {"prompt": "x"}, [("image", png())], key=key), 401, None)
            assert error["code"] == "invalid_api_key" and KEY not in error["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{lb.url}/v1", api_key="wrong", max_retries=0).models.list()
        runsync = requests.post(f"{lb.url}/runsync", json={"input": {}}, timeout=30)
        assert_openai_error(runsync, 401, None)


class TestBurst:
    def test_a_burst_past_the_limit_gets_429s_and_every_other_request_its_pictures(self, lb: LbWorker) -> None:
        """CONCURRENCY=2 + LB_MAX_WAITING=1: of 8 requests at once, at most 3 are held; the rest get 429 at once."""
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: form_post(lb, {"prompt": "x", "seed": str(i), **SMALL},
                                                        [("image", png(i))]), range(8)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {200, 429} and statuses.count(200) >= 3, statuses
        for answer in answers:
            if answer.status_code == 429:
                assert assert_openai_error(answer, 429, None)["code"] == "rate_limit_exceeded"
                assert answer.headers["Retry-After"]
            else:
                assert decoded(answer.json()["data"][0]["b64_json"]).size == (64, 64)

    def test_still_healthy_after_everything(self, lb: LbWorker, client: openai.OpenAI) -> None:
        assert requests.get(f"{lb.health_url}/ping", timeout=10).status_code == 200
        answer = client.images.edit(image=("in.png", png(), "image/png"), prompt="once more", size="64x64")
        assert decoded(answer.data[0].b64_json or "").size == (64, 64)
        assert lb.process.poll() is None and "Traceback" not in lb.log.read_text()


class TestWhileLoading:
    def test_a_request_waits_for_the_model_and_one_past_the_limit_gets_503(self, tmp_path: Path) -> None:
        """CONCURRENCY=1, LB_MAX_WAITING=0: while /ping says 204 the first request is held until the model is
        ready (a cold start); a second finds the worker full and is told the model is loading."""
        with serve_lb(tmp_path / "worker.log", CONCURRENCY="1", LB_MAX_WAITING="0") as worker:
            assert worker.wait_ping((204,), START_TIMEOUT) == 204
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(form_post, worker, {"prompt": "x", **SMALL}, [("image", png())], None)
                time.sleep(1)  # the first is held within milliseconds; the tiny model loads for tens of seconds
                assert requests.get(f"{worker.url}/ping", timeout=5).status_code == 204, "loaded too soon to test"
                second = form_post(worker, {"prompt": "y", **SMALL}, [("image", png())], key=None)
                assert assert_openai_error(second, 503, None)["code"] == "model_loading", worker.log_tail()
                assert second.headers["Retry-After"]
                answer = first.result(timeout=CALL_TIMEOUT)
            assert answer.status_code == 200, answer.text
            assert answer.json()["timing"]["cold_start"] is True


class TestBrokenWorker:
    @pytest.mark.parametrize(("env", "reason"), [
        ({"CONCURRENCY": "9"}, "bad setting: CONCURRENCY: must be a whole number from 1 to 4"),
        ({"TINY_MODEL": "0", "MODEL_PATH": "/nonexistent/model"}, "the model cannot load: MODEL_PATH"),
        ({"ENDPOINT_TYPE": "balancer"}, "bad setting: ENDPOINT_TYPE: must be one of queue, lb"),
    ])
    def test_ping_503_with_the_reason_and_the_worker_stays_up(self, tmp_path: Path, env: dict[str, str],
                                                              reason: str) -> None:
        with serve_lb(tmp_path / "worker.log", **env) as worker:
            worker.wait_ping((503,), START_TIMEOUT)
            for base in (worker.health_url, worker.url):
                error = assert_openai_error(requests.get(f"{base}/ping", timeout=10), 503, None)
                assert error["message"].startswith(reason), error
            edit = form_post(worker, {"prompt": "x"}, [("image", png())], key=None)
            assert reason.split(": ", 1)[1] in assert_openai_error(edit, 503, None)["message"]
            assert worker.process.poll() is None
