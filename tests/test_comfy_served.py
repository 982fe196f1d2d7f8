"""worker-comfyui's request as a caller sends it: through the SDK's local API (`/runsync`) and under RunPod's
real job loop (handler.py deployed against a fake queue on loopback), on the tiny model.

What broke before: the job loop's answer for a workflow was an error; nothing was tested outside the
Worker object.  Both servers are started once for the module; no request leaves this machine.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from api_server import Api, serve_api
from comfy_fixtures import EDIT_2511, INT8_2511, PLUS_2509, RELIGHT, comfy_job, template, tiny
from fake_queue import FakeQueue, deployed_worker, serve_queue
from lora_files import FileServer, Route, lora_bytes

TIMEOUT = 240


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with serve_api(tmp_path_factory.mktemp("comfy-api"), MODEL_VARIANT="edit-2511", WARMUP="1",
                   RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true", RUNPOD_SKIP_GPU_CHECK="true") as server:
        yield server


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeQueue, Path, FileServer]]:
    root = tmp_path_factory.mktemp("comfy-deployed")
    with FileServer({"/relight.safetensors": Route(lora_bytes(42))}) as files, serve_queue() as queue, \
            deployed_worker(queue, root / "worker.log", MODEL_VARIANT="edit-2509", ALLOW_LOOPBACK_URLS="1",
                            LORA_CACHE_DIR=str(root / "cache"), LOG_LEVEL="INFO"):
        yield queue, root / "worker.log", files


def runsync(api: Api, body: dict[str, object]) -> dict[str, object]:
    reply = requests.post(f"{api.url}/runsync", json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text[:500]
    return reply.json()


class TestLocalApi:
    @pytest.mark.parametrize("name", [EDIT_2511, INT8_2511])
    def test_runsync_answers_worker_comfyuis_shape(self, api: Api, name: str) -> None:
        answer = runsync(api, comfy_job(tiny(template(name))))
        assert answer["status"] == "COMPLETED", answer
        output = answer["output"]
        [item] = output["images"]  # type: ignore[index]
        assert item["filename"].startswith("Qwen_Edit_2511_00001") and item["type"] == "base64"
        assert base64.b64decode(item["data"])[:4] == b"\x89PNG"
        assert "timing" in output and "cost" in output  # type: ignore[operator]

    def test_a_clean_error_is_the_jobs_error(self, api: Api) -> None:
        answer = runsync(api, {"input": {"workflow": {"nodes": [], "links": []}}})
        assert answer["error"] == ("input.workflow: this is ComfyUI's UI format (nodes and links); export the "
                                   "workflow with Workflow > Export (API) and send that")


class TestJobLoop:
    def test_the_2509_templates_deployed(self, deployed: tuple[FakeQueue, Path, FileServer]) -> None:
        queue, log, files = deployed
        relight = tiny(template(RELIGHT))
        relight["10:118"]["inputs"]["lora_name"] = f"{files.url}/relight.safetensors?X-Amz-Signature=SECRET"
        plain = comfy_job(tiny(template(PLUS_2509)), job_id="comfy-2509")
        queue.put(plain, comfy_job(relight, job_id="comfy-relight"),
                  comfy_job({"1": {"class_type": "KSampler", "inputs": {}}}, job_id="comfy-bad"))
        results = queue.wait_done(["comfy-2509", "comfy-relight", "comfy-bad"], 3 * TIMEOUT)
        for job_id, name in (("comfy-2509", "Qwen_Image_2509_00001.png"), ("comfy-relight", "ComfyUI_00001_.png")):
            body = results[job_id].body
            assert "error" not in body, body
            [item] = body["output"]["images"]
            assert item["filename"] == name and base64.b64decode(item["data"])[:4] == b"\x89PNG"
        assert results["comfy-relight"].body["output"]["model"]["loras"][0]["source"] == "url"
        assert results["comfy-bad"].body["error"].startswith("input.workflow.1.inputs.model: required")
        text = log.read_text()
        assert "SECRET" not in text and plain["input"]["images"][0]["image"][-60:] not in text  # type: ignore[index]
        assert "Replace the cat" not in text  # no prompt in the log
