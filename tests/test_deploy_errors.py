"""`qwen-edit deploy`'s errors against the loopback fake of RunPod's REST API v2: each one clear line and a
non-zero exit (401, 403, 400, 422, 429 and 5xx retried, a dropped connection, no network, a create never sent
twice), the key scrubbed even when a server echoes it; and the PATCH built from an existing endpoint."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from api_server import free_port
from deploy_harness import IMAGE, Ran, api_fixture, run_fixture  # noqa: F401  (fixtures: api, run)
from qwen_edit_client.endpoint_settings import changes
from runpod_rest import FakeRunPodApi, problems

UPDATE = "#/components/schemas/UpdateEndpointRequest"


class TestErrors:
    @pytest.mark.parametrize(("route", "answers", "said"), [
        ("GET /v2/serverless", [401], "RunPod answered 401 (injected by the test): the API key was refused; check "
                                      "RUNPOD_API_KEY"),
        ("POST /v2/serverless", [403], "RunPod answered 403 (injected by the test): the API key lacks this permission"),
        ("POST /v2/serverless", [400], "creating endpoint 'qwen-image-edit-2511-80gb': RunPod answered 400 (injected "
                                       "by the test): $.gpu.pools[0]: value must be one of the serverless pools; "
                                       "nothing was changed"),
        ("POST /v2/serverless", [422], "RunPod answered 422 (injected by the test): $.gpu.pools[0]: value must be"),
        ("POST /v2/serverless", [429] * 6, "RunPod answered 429 6 times (injected by the test); try again in a few"),
        ("POST /v2/serverless", [500], "RunPod answered 500 (injected by the test); try again in a few minutes; the "
                                       "endpoint may have been created: run the same command again"),
        ("POST /v2/serverless", ["drop"], "cannot reach"),
        ("GET /v2/serverless", ["drop"] * 6, "listing your endpoints: cannot reach"),
    ])
    def test_one_clear_line(self, api: FakeRunPodApi, run: Callable[..., Ran], route: str, answers: list[int | str],
                            said: str) -> None:
        api.inject[route] = list(answers)
        ran = run("--image", IMAGE, "--gpu-class", "80", "--json")
        assert ran.code == 2 and said in ran.err, ran.err
        assert len(ran.err.strip().splitlines()) == 1 and ran.json["error"] in ran.err
        assert not api.endpoints  # nothing half-made
        method, path = route.split()
        tried = [s for m, p, s in api.seen if (m, p) == (method, path)]
        assert tried == answers[:6] if method == "GET" or answers[0] == 429 else tried == answers[:1]  # no 2nd create

    def test_a_create_that_loses_its_answer_says_what_to_do(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        api.inject["POST /v2/serverless"] = ["drop"]
        ran = run("--image", IMAGE, "--gpu-class", "80")
        assert "the endpoint may have been created: run the same command again (it finds the endpoint by name" \
            in ran.err

    def test_429_and_5xx_are_retried(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        api.inject = {"GET /v2/catalog/gpus": [429, 503], "GET /v2/serverless": [429], "POST /v2/serverless": [429]}
        ran = run("--image", IMAGE, "--gpu-class", "80", "--no-smoke")
        assert ran.code == 0, ran.err
        assert [s for _, _, s in api.seen] == [429, 503, 200, 429, 200, 429, 201]
        api.inject = {"PATCH /v2/serverless/{id}": [500, "drop"]}  # the same PATCH again changes nothing twice
        assert run("--image", IMAGE, "--gpu-class", "80", "--no-smoke", "--max-workers", "2").code == 0
        assert [s for m, _, s in api.seen if m == "PATCH"] == [500, "drop", 200]

    def test_a_catalog_that_cannot_be_read_leaves_the_workers_table(self, api: FakeRunPodApi,
                                                                    run: Callable[..., Ran]) -> None:
        api.inject["GET /v2/catalog/gpus"] = [500] * 6
        ran = run("--image", IMAGE, "--gpu-class", "80", "--dry-run", "--json")
        assert ran.code == 0 and "GPU_PRICES" not in ran.json["requests"][-1]["body"]["env"]
        assert "GPU_PRICES not set (the catalog could not be read: reading the GPU catalog: RunPod answered 500" \
            in ran.out

    def test_unreachable(self, api: FakeRunPodApi, run: Callable[..., Ran], monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RUNPOD_API_URL", f"http://127.0.0.1:{free_port()}")
        ran = run("--image", IMAGE, "--gpu-class", "80", "--dry-run")
        assert ran.code == 2 and "listing your endpoints: cannot reach http://127.0.0.1:" in ran.err
        assert "check the network, or RUNPOD_API_URL" in ran.err

    def test_a_server_that_echoes_the_key_is_scrubbed(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        """What makes the key check able to fail: RunPod's detail, were it to quote the header, is printed."""
        api.echo_key = True
        api.inject["POST /v2/serverless"] = [422]
        ran = run("--image", IMAGE, "--gpu-class", "80", "--json")  # run() asserts the key is not in the output
        assert ran.code == 2 and "the request carried 'Bearer <RUNPOD_API_KEY>'" in ran.err


class TestChanges:
    WANT = {"name": "n", "type": "QUEUE", "image": "i", "disk": 80, "timeout": 300000, "flashboot": "FLASHBOOT",
            "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}, "env": {"A": "1"},
            "gpu": {"pools": ["AMPERE_80"], "count": 1, "allowedCudaVersions": ["12.8"]},
            "workers": {"min": 0, "max": 1, "idleTimeout": 1}}

    def test_a_cuda_floor_is_cleared_and_exclusions_are_said(self) -> None:
        have = json.loads(json.dumps(self.WANT)) | {"id": "x"}
        have["gpu"] = {"pools": ["ADA_80_PRO"], "count": 1, "allowedCudaVersions": [], "minCudaVersion": "12.1",
                       "excludedTypes": ["NVIDIA H100 PCIe"]}
        patch, notes = changes(self.WANT, have)
        assert patch == {"gpu": {"pools": ["AMPERE_80"], "allowedCudaVersions": ["12.8"], "minCudaVersion": ""}}
        assert problems(UPDATE, patch) == [] and notes == ["new pools clear the excluded GPU types (NVIDIA H100 PCIe)"]

    def test_the_type_cannot_change(self) -> None:
        with pytest.raises(ValueError, match="is a LOAD_BALANCER endpoint and RunPod cannot change that to QUEUE"):
            changes(self.WANT, {**self.WANT, "type": "LOAD_BALANCER", "id": "x"})
