"""`qwen-edit deploy` against a loopback fake of RunPod's REST API v2 that holds every body to RunPod's own
OpenAPI document (tests/runpod_rest.py), with the smoke job answered by the real tiny worker: the bodies for
every class, every option, the plan's choice, what is refused before any request, create, a second identical
run, an update, and the first job.  Errors: tests/test_deploy_errors.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy_harness import IMAGE, KEY, Ran, api_fixture, per_second, run_fixture, sent  # noqa: F401  (fixtures: api, run)
from qwen_edit_client import deploy_table
from qwen_edit_client.cli import main
from runpod_rest import FakeRunPodApi, problems

CREATE = "#/components/schemas/CreateEndpointRequest"
UPDATE = "#/components/schemas/UpdateEndpointRequest"


class TestDryRun:
    @pytest.mark.parametrize("lb", [False, True], ids=["queue", "lb"])
    @pytest.mark.parametrize("gpu_class", ["24", "48", "80", "141"])
    def test_bodies_validate_against_runpods_schema(self, api: FakeRunPodApi, run: Callable[..., Ran],
                                                    gpu_class: str, lb: bool) -> None:
        ran = run("--image", IMAGE, "--gpu-class", gpu_class, "--dry-run", "--json", *(["--lb"] if lb else []))
        assert ran.code == 0, ran.err
        calls = ran.json["requests"]
        assert [(c["method"], c["path"]) for c in calls] == [
            ("GET", "/v2/catalog/gpus"), ("GET", "/v2/serverless"), ("POST", "/v2/serverless")]
        body = calls[-1]["body"]
        assert problems(CREATE, body) == []
        assert not sent(api, "POST") and not sent(api, "PATCH")  # reads only
        preset = deploy_table.gpu_class(gpu_class)
        assert body["gpu"] == {"pools": preset["pools"], "count": 1, "allowedCudaVersions": ["12.8", "12.9", "13.0"]}
        printed = ran.out.split("sending nothing:\n", 1)[1].split("\nslim image", 1)[0]
        assert json.loads(printed) == body  # the exact body, printed
        env = dict(body["env"])
        assert json.loads(env.pop("GPU_PRICES")) == per_second(preset["pools"])  # catalog USD/h -> USD/s
        extra = {"MODEL_VARIANT": "edit-2511"} | ({"ENDPOINT_TYPE": "lb"} if lb else {})
        assert env == preset["env"] | extra
        assert body["type"] == ("LOAD_BALANCER" if lb else "QUEUE") and body["disk"] == 80
        assert body["scaling"] == ({"type": "REQUEST_COUNT", "requestCount": 2} if lb else
                                   {"type": "QUEUE_DELAY", "queueDelay": 4})
        assert body["name"] == f"qwen-image-edit-2511-{gpu_class}gb" + ("-lb" if lb else "")
        assert ran.json["outcome"] == "dry run: create" and "endpoint" not in ran.json and "smoke" not in ran.json
        assert "Model = Qwen/Qwen-Image-Edit-2511" in ran.out  # the slim image's one console step

    def test_without_a_key_nothing_is_read(self, api: FakeRunPodApi, run: Callable[..., Ran],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("RUNPOD_API_KEY")
        ran = run("--image", IMAGE, "--gpu-class", "48", "--dry-run", "--json")
        assert ran.code == 0 and api.seen == []
        body = ran.json["requests"][0]["body"]
        assert problems(CREATE, body) == [] and "GPU_PRICES" not in body["env"]
        assert "GPU_PRICES not set (no API key" in ran.out
        ran = run("--image", IMAGE, "--gpu-class", "48")
        assert ran.code == 2 and "no API key: set RUNPOD_API_KEY or pass --api-key-file" in ran.err and api.seen == []

    def test_key_from_a_file(self, api: FakeRunPodApi, run: Callable[..., Ran], monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
        monkeypatch.setenv("RUNPOD_API_KEY", "rpa_not_this_one")
        (tmp_path / "key").write_text(f"{KEY}\n")
        ran = run("--image", IMAGE, "--gpu-class", "80", "--dry-run", "--api-key-file", str(tmp_path / "key"))
        assert ran.code == 0 and [s for _, _, s in api.seen] == [200, 200]
        ran = run("--image", IMAGE, "--gpu-class", "80", "--dry-run", "--api-key-file", str(tmp_path / "none"))
        assert ran.code == 2 and f"--api-key-file {tmp_path / 'none'}: cannot read it" in ran.err

    @pytest.mark.parametrize(("bake", "pools", "disk"), [("int8", ["AMPERE_24", "ADA_24"], 50),
                                                         ("fp8", ["ADA_24"], 50)])
    def test_the_bake_decides_precision_disk_and_pools(self, api: FakeRunPodApi, run: Callable[..., Ran], bake: str,
                                                       pools: list[str], disk: int) -> None:
        ran = run("--image", IMAGE, "--gpu-class", "24", "--bake", bake, "--dry-run", "--json")
        body = ran.json["requests"][-1]["body"]
        assert ran.code == 0 and problems(CREATE, body) == []
        assert (body["env"]["PRECISION"], body["env"]["TEXT_ENCODER_PRECISION"]) == (bake, bake)
        assert body["gpu"]["pools"] == pools and body["disk"] == disk
        assert json.loads(body["env"]["GPU_PRICES"]) == per_second(pools)
        if bake == "fp8":
            assert "fp8 runs on Ada and Hopper GPUs only: pool(s) AMPERE_24 left out" in ran.out

    def test_every_option_reaches_the_body(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        ran = run("--image", IMAGE, "--gpu-class", "48", "--name", "mine", "--variant", "edit-2509", "--max-workers",
                  "4", "--idle-timeout", "30", "--flashboot", "off", "--env", "LOG_LEVEL=DEBUG", "--env",
                  "HF_TOKEN=hf_SECRETVALUE", "--env", "LOG_LEVL=x", "--dry-run", "--json")
        assert ran.code == 0, ran.err
        body = ran.json["requests"][-1]["body"]
        assert problems(CREATE, body) == []
        assert body["name"] == "mine" and body["workers"] == {"min": 0, "max": 4, "idleTimeout": 30}
        assert body["flashboot"] == "OFF" and body["env"]["MODEL_VARIANT"] == "edit-2509"
        assert body["env"]["LOG_LEVEL"] == "DEBUG" and body["env"]["HF_TOKEN"] == "<hidden>"
        assert "hf_SECRETVALUE" not in ran.text  # other secrets' values are not printed either
        assert "Model = Qwen/Qwen-Image-Edit-2509" in ran.out
        assert "--env LOG_LEVL: not a setting this worker reads (a typo?)" in ran.out
        got = ran.json["settings"]
        assert got["workers.max"] == {"value": 4, "from": "--max-workers"}
        assert got["workers.idleTimeout"]["from"] == "--idle-timeout" and got["flashboot"]["from"] == "--flashboot"
        assert got["env.MODEL_VARIANT"]["from"] == "--variant" and got["env.LOG_LEVEL"]["from"] == "--env"

    def test_the_plan_picks_workers_idle_timeout_and_flashboot(self, api: FakeRunPodApi, run: Callable[..., Ran],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
        """The same choice `qwen-edit plan` makes over the same grid, for the traffic given."""
        for traffic in (["--rate", "1200/h"], ["--rate", "12/h"], ["--rate", "1200/h", "--p95", "20"]):
            ran = run("--image", IMAGE, "--gpu-class", "80", "--dry-run", "--json", *traffic)
            assert ran.code == 0
            assert main(["plan", *traffic, "--jobs", "200", "--seed", "0", "--gpu", "a100,h100", "--max-workers",
                         "1,2,3,5", "--active-workers", "0", "--idle-timeout", "1,5,15,60", "--flashboot", "on,off",
                         "--json"]) == 0
            chosen = json.loads(capsys.readouterr().out)["recommended"]["config"]
            body = ran.json["requests"][-1]["body"]
            assert body["workers"] == {"min": 0, "max": chosen["max_workers"], "idleTimeout": chosen["idle_timeout_s"]}
            assert body["flashboot"] == ("FLASHBOOT" if chosen["flashboot"] else "OFF")
            assert f"Poisson at {traffic[1].removesuffix('/h')}/h" in ran.out
        ran = run("--image", IMAGE, "--gpu-class", "80", "--dry-run")
        assert "no traffic given: one job every 5 minutes (200 jobs, Poisson at 12/h" in ran.out

    def test_traffic_from_logs(self, api: FakeRunPodApi, run: Callable[..., Ran], tmp_path: Path) -> None:
        log = tmp_path / "edits.jsonl"
        log.write_text("".join(json.dumps({"status": "COMPLETED", "submitted_at": f"2026-12-01T10:{m:02d}:00+00:00",
                                           "executionTime": 1500, "delayTime": 200}) + "\n" for m in range(0, 60, 3)))
        ran = run(str(log), "--image", IMAGE, "--gpu-class", "80", "--dry-run", "--json")
        assert ran.code == 0 and "20 jobs replayed from 1 log(s)" in ran.out
        assert run(str(log), "--rate", "5/h", "--image", IMAGE, "--gpu-class", "80", "--dry-run").code == 2

    def test_no_configuration_meets_the_p95(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        ran = run("--image", IMAGE, "--gpu-class", "24", "--p95", "0.5", "--json")
        assert ran.code == 1 and "--p95 0.5: no configuration meets it" in ran.err and api.seen == []
        assert ran.json["requests"] == []


class TestRefusedBeforeAnyRequest:
    @pytest.mark.parametrize(("args", "said"), [
        (["--gpu-class", "24", "--env", "PRECISION=bf16", "--env", "OFFLOAD=none"],
         "AMPERE_24 (smallest card: NVIDIA L4): OFFLOAD=none does NOT fit"),
        (["--gpu-class", "48", "--env", "PRECISION=bf16", "--env", "TEXT_ENCODER_PRECISION=bf16", "--env",
          "OFFLOAD=none"], "AMPERE_48 (smallest card: NVIDIA A40): OFFLOAD=none does NOT fit"),
        (["--gpu-class", "80", "--bake", "int8", "--env", "PRECISION=bf16"], "an image baked int8 loads PRECISION"),
        (["--gpu-class", "80", "--env", "PRECISION=fp9"], "PRECISION=fp9: the worker takes one of bf16, int8, fp8"),
        (["--gpu-class", "80", "--env", "no-equals"], "--env: KEY=VALUE"),
    ])
    def test_refused(self, api: FakeRunPodApi, run: Callable[..., Ran], args: list[str], said: str) -> None:
        ran = run("--image", IMAGE, *args)
        assert ran.code == 2 and said in ran.err and api.seen == []
        assert len(ran.err.strip().splitlines()) == 1  # one clear line

    @pytest.mark.parametrize("args", [["--idle-timeout", "0"], ["--idle-timeout", "3601"], ["--max-workers", "0"],
                                      ["--flashboot", "maybe"], ["--gpu-class", "32"], ["--bake", "int4"],
                                      ["--variant", "edit-2512"], ["--rate", "lots"]])
    def test_bad_option_values(self, api: FakeRunPodApi, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exited:
            main(["deploy", "--image", IMAGE, "--gpu-class", "80", *args])
        assert exited.value.code == 2 and args[0] in capsys.readouterr().err and api.seen == []

    def test_a_preset_that_fits_is_not_refused(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        ran = run("--image", IMAGE, "--gpu-class", "24", "--env", "PRECISION=bf16", "--dry-run")
        assert ran.code == 0 and "OFFLOAD=group (the fastest that fits)" in ran.out  # streams, slowly, but fits


class TestCreateAndUpdate:
    def test_create_then_nothing_then_an_update(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        first = run("--image", IMAGE, "--gpu-class", "80", "--json")
        assert first.code == 0, first.text
        (path, body), = sent(api, "POST")
        assert path == "/v2/serverless" and problems(CREATE, body) == []
        endpoint = first.json["endpoint"]
        assert first.json["outcome"] == "create" and endpoint == api.endpoints[endpoint["id"]]
        assert f"endpoint {endpoint['id']} (qwen-image-edit-2511-80gb) created" in first.out
        assert endpoint["requestUrls"]["run"] in first.out and endpoint["requestUrls"]["status"] in first.out
        assert f"smoke job on {endpoint['id']}: COMPLETED" in first.err  # the progress line, on stderr
        smoked = first.json["smoke"]
        assert smoked["status"] == "COMPLETED" and smoked["timing"]["cold_start"] in (True, False)
        assert (smoked["delayTime"], smoked["executionTime"]) == (1234, 2345)  # RunPod's figures, from the queue
        assert smoked["cost"]["price_source"] == "unknown"  # a CPU worker: no GPU to price, GPU_PRICES or not
        assert f"delay 1.23 s (RunPod delayTime), execution {2345 / 1000:.2f} s (RunPod executionTime)" in first.out
        assert f"Serverless, endpoint {endpoint['id']}, Manage, Edit Endpoint, Model = Qwen/Qwen-Image-Edit-2511" \
            in first.out

        second = run("--image", IMAGE, "--gpu-class", "80", "--json")
        assert second.code == 0 and second.json["outcome"] == "unchanged"
        assert len(sent(api, "POST")) == 1 and not sent(api, "PATCH") and "smoke" not in second.json
        assert [(c["method"], c["path"]) for c in second.json["requests"]] == [
            ("GET", "/v2/catalog/gpus"), ("GET", "/v2/serverless")]

        third = run("--image", IMAGE, "--gpu-class", "80", "--max-workers", "3", "--no-smoke", "--json")
        assert third.code == 0 and third.json["outcome"] == "update"
        (path, patch), = sent(api, "PATCH")
        assert path == f"/v2/serverless/{endpoint['id']}" and problems(UPDATE, patch) == []
        assert patch == {"workers": {"min": 0, "max": 3, "idleTimeout": endpoint["workers"]["idleTimeout"]}}
        assert api.endpoints[endpoint["id"]]["workers"]["max"] == 3 and "no smoke job (--no-smoke)" in third.out

    def test_settings_set_in_the_console_are_kept(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        assert run("--image", IMAGE, "--gpu-class", "141", "--no-smoke").code == 0
        endpoint = next(iter(api.endpoints.values()))
        endpoint["env"]["BUCKET_NAME"] = "mine"  # as if set in the console
        ran = run("--image", IMAGE + "-v2", "--gpu-class", "141", "--no-smoke", "--json")
        (_, patch), = sent(api, "PATCH")
        assert patch == {"image": IMAGE + "-v2"}  # the env is unchanged: BUCKET_NAME stays, nothing resent
        assert "kept 1 setting(s) the endpoint has that deploy does not set: BUCKET_NAME" in ran.out
        ran = run("--image", IMAGE + "-v2", "--gpu-class", "141", "--no-smoke", "--env", "LOG_LEVEL=DEBUG")
        (_, patch) = sent(api, "PATCH")[-1]
        assert patch["env"]["BUCKET_NAME"] == "mine" and patch["env"]["LOG_LEVEL"] == "DEBUG"
        assert problems(UPDATE, patch) == [] and api.endpoints[endpoint["id"]]["env"]["BUCKET_NAME"] == "mine"

    def test_load_balancing_endpoint_and_its_first_job(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        ran = run("--image", IMAGE, "--gpu-class", "80", "--lb", "--json")
        assert ran.code == 0, ran.text
        endpoint = ran.json["endpoint"]
        assert endpoint["type"] == "LOAD_BALANCER" and set(endpoint["requestUrls"]) == {"base", "health"}
        assert ran.json["smoke"]["status"] == "COMPLETED" and "smoke job" in ran.out  # base + /runsync
        ran = run("--image", IMAGE, "--gpu-class", "80", "--name", endpoint["name"], "--dry-run")  # a queue one
        assert ran.code == 2 and "is a LOAD_BALANCER endpoint and RunPod cannot change that to QUEUE" in ran.err

    def test_a_failed_first_job_shows_the_workers_error_and_the_endpoint(self, api: FakeRunPodApi,
                                                                         run: Callable[..., Ran]) -> None:
        ran = run("--image", IMAGE, "--gpu-class", "80", "--env", "GPU_PRICES=NVIDIA H200=0.00155", "--json")
        assert ran.code == 1
        endpoint_id = ran.json["endpoint"]["id"]
        assert ran.json["smoke"]["status"] == "FAILED"
        assert "FAILED: GPU_PRICES: must be a JSON object" in ran.out  # the worker's own error
        assert f"the endpoint {endpoint_id} exists with the settings above" in ran.err

    def test_a_name_that_matches_two_endpoints(self, api: FakeRunPodApi, run: Callable[..., Ran]) -> None:
        body = run("--image", IMAGE, "--gpu-class", "48", "--dry-run", "--json").json["requests"][-1]["body"]
        ids = [api.add(body)["id"] for _ in range(2)]
        ran = run("--image", IMAGE, "--gpu-class", "48")
        said = f"2 endpoints are named 'qwen-image-edit-2511-48gb' (ids {ids[0]}, {ids[1]})"
        assert ran.code == 2 and said in ran.err
        assert not sent(api, "POST") and not sent(api, "PATCH")
