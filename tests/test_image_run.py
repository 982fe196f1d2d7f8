"""The image, built and run for real: the unmodified Dockerfile built with a private Docker daemon, then
run as RunPod runs it (RUNPOD_WEBHOOK_* pointing at a fake queue on the host, `--network host`).

Only build args change: the Debian stand-in base through CUDA_IMAGE (no registry is reachable),
PyPI's CUDA 13 torch through TORCH_INDEX_URL and TORCH_CUDA, and the bake pointed through
HF_ENDPOINT at a loopback hub serving a tiny model behind a token, passed as a BuildKit secret.
Two images share every layer up to the bake: the full one (the tiny model baked) and the slim one
(BAKE_MODEL=0: the Lightning LoRA only; the model from RunPod's cache mounted at /runpod-volume).  Both
bake the safety checker (a tiny classifier served as Falconsai/nsfw_image_detection at the pinned commit)
and answer with it.

What broke before: nothing had ever built the image; the Dockerfile's `# syntax=` line needs a
registry, and the bake could not be pointed at any hub but huggingface.co.

Cost (docs/development.md, "What `make test` costs"): the first run on a machine installs docker.io
and debootstrap, makes the base and downloads torch and the nvidia-* wheels (~4.5 GB); later runs
reuse the daemon's layer cache in tests/docker_env.CACHE.  Measurements are printed (pytest -s)
and written to CACHE/last-run.txt.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

import docker_env
from api_server import free_port
from fake_queue import FakeQueue, serve_queue
from hub_server import SAFETY_CHECKER_COMMIT, SAFETY_CHECKER_REPO, Hub, Repo, safety_checker_repo
from qwen_edit_worker.model import tiny
from qwen_edit_worker.weights.variants import VARIANTS

pytestmark = pytest.mark.timeout(3600)  # a cold first run builds for several minutes; see docs/development.md

ROOT = Path(__file__).resolve().parent.parent
VARIANT = VARIANTS["edit-2511"]  # the Dockerfile's default MODEL_VARIANT
MODEL_COMMIT = "0123456789abcdef0123456789abcdef01234567"
LORA_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CACHE_COMMIT = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed"
CHECKER = f"{SAFETY_CHECKER_REPO}@{SAFETY_CHECKER_COMMIT[:12]}"
TESTS = json.loads((ROOT / "tests.json").read_text())["tests"]
JOB_TIMEOUT = 900  # seconds for a container to start and answer its jobs on 2 shared cores
# What RunPod's platform sets besides the webhooks; the SDK's start-up checks need a GPU and the internet.
RUNPOD_ENV = {"RUNPOD_SKIP_GPU_CHECK": "true", "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "LOG_LEVEL": "INFO"}


@dataclass
class Built:
    daemon: docker_env.Daemon
    full: str
    slim: str
    token: str
    model_files: dict[str, bytes]
    work: Path
    measured: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Both images, built once for this module by a daemon that is always ended afterwards."""
    reason = docker_env.why_docker_cannot_run()
    if reason:
        print(f"SKIPPED the image test: {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("image")
    log = work / "build.log"
    started = time.monotonic()
    docker_env.install_tools(log)
    measured: dict[str, Any] = {"tools_s": round(time.monotonic() - started, 1)}
    token = "hf_imagetest_" + secrets.token_hex(12)
    model_files = tiny_model_files(work / "tiny-model")
    lora = tiny.write_lora(work / "lightning.safetensors").read_bytes()
    repos = {VARIANT.repo: Repo(files=model_files, commit=MODEL_COMMIT, token=token),
             VARIANT.lora_repo: Repo(files={VARIANT.lora_file: lora}, commit=LORA_COMMIT, token=token),
             SAFETY_CHECKER_REPO: replace(safety_checker_repo(work / "safety-checker"), token=token)}
    secret = work / "hf_token"
    secret.write_text(token)
    with docker_env.Daemon(docker_env.CACHE / "docker") as daemon, Hub(repos) as hub:
        started = time.monotonic()
        base = docker_env.base_image(daemon, log)
        measured["base_s"] = round(time.monotonic() - started, 1)
        args = {"CUDA_IMAGE": base, "TORCH_INDEX_URL": "https://pypi.org/simple", "TORCH_CUDA": "13",
                "HF_ENDPOINT": hub.url}
        tag = f"qwen-edit-image-test:{uuid.uuid4().hex[:8]}"
        full, slim = f"{tag}-full", f"{tag}-slim"
        measured["build_full_s"] = round(docker_env.build(daemon, full, ROOT, log, args,
                                                          [f"id=hf_token,src={secret}"]), 1)
        measured["build_slim_s"] = round(docker_env.build(daemon, slim, ROOT, log, {**args, "BAKE_MODEL": "0"},
                                                          [f"id=hf_token,src={secret}"]), 1)
        result = Built(daemon, full, slim, token, model_files, work, measured)
        try:
            measure(result)
            yield result
        finally:
            daemon.docker("image", "rm", "-f", full, slim, check=False)
            daemon.docker("image", "prune", "-f", check=False)  # earlier runs' untagged leftovers
            daemon.docker("builder", "prune", "-f", "--keep-storage", "20gb", check=False)  # the cache, bounded


def tiny_model_files(folder: Path) -> dict[str, bytes]:
    import diffusers

    pipe = getattr(diffusers, VARIANT.pipeline_class)(**tiny.build_components(VARIANT, tiny.base_scheduler()))
    pipe.save_pretrained(folder)
    return Repo.from_folder(folder).files


def measure(built: Built) -> None:
    """Image and layer sizes and the nvidia-* wheels' bytes, printed and kept in CACHE/last-run.txt."""
    docker = built.daemon.docker
    for name, image in (("full", built.full), ("slim", built.slim)):
        built.measured[f"{name}_image_bytes"] = int(docker("image", "inspect", "-f", "{{.Size}}", image)
                                                    .stdout.decode().strip())
    layers = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", built.full).stdout.decode()
    built.measured["full_layers"] = [line[:160] for line in layers.splitlines() if not line.startswith("0B")]
    du = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", built.full, "-c",
                "cd /opt/venv/lib/python3*/site-packages && du -sb nvidia/* nvidia cuda torch triton . | sort -rn"
                ).stdout.decode()
    built.measured["site_packages_bytes"] = [line for line in du.splitlines() if int(line.split()[0]) > 10**7]
    report = json.dumps(built.measured, indent=2)
    print(f"image test measurements:\n{report}")
    (docker_env.CACHE / "last-run.txt").write_text(report + "\n")


@contextmanager
def container(built: Built, image: str, queue: FakeQueue, *options: str) -> Iterator[str]:
    """`docker run` of `image` as RunPod starts a worker; always removed afterwards."""
    name = f"qwen-edit-test-{uuid.uuid4().hex[:10]}"
    env = [f"--env={key}={value}" for key, value in {**queue.env(), **RUNPOD_ENV}.items()]
    built.daemon.docker("run", "-d", "--name", name, "--network", "host", *env, *options, image)
    try:
        yield name
    finally:
        built.daemon.docker("rm", "-f", name, check=False)


def run_once(built: Built, *argv: str) -> subprocess.CompletedProcess[bytes]:
    """`docker run --rm` without a network; removed by name even when the client is timed out."""
    name = f"qwen-edit-test-{uuid.uuid4().hex[:10]}"
    try:
        return built.daemon.docker("run", "--rm", "--name", name, "--network", "none", *argv, check=False,
                                   timeout=JOB_TIMEOUT)
    finally:
        built.daemon.docker("rm", "-f", name, check=False)


def logs(built: Built, name: str, chars: int = 4000) -> str:
    return built.daemon.docker("logs", name, check=False).stdout.decode(errors="replace")[-chars:]


def answers(built: Built, name: str, queue: FakeQueue, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    queue.put(*jobs)
    try:
        done = queue.wait_done([job["id"] for job in jobs], JOB_TIMEOUT)
    except TimeoutError as err:
        pytest.fail(f"{err}; the container's log:\n{logs(built, name)}")
    return {job_id: event.body for job_id, event in done.items()}


class TestBakedImage:
    def test_tests_json_and_a_bad_input_through_runpods_job_loop(self, built: Built) -> None:
        """Every tests.json case answered by the model the image baked (not TINY_MODEL), with progress."""
        jobs = [{"id": f"case-{n}", "input": case["input"]} for n, case in enumerate(TESTS)]
        bad = {"id": "bad", "input": {**TESTS[0]["input"], "num_images": 9}}
        with serve_queue() as queue, container(built, built.full, queue) as name:
            results = answers(built, name, queue, [*jobs, bad])
            for job, case in zip(jobs, TESTS, strict=True):
                body = results[job["id"]]
                assert "error" not in body, (case["name"], body.get("error"), logs(built, name))
                output = body["output"]
                assert output["images"] and output["images"][0]["type"] == "base64"
                assert output["model"]["source"] == f"/models/{VARIANT.name}"
                assert output["model"]["manifest"] == {"model": f"{VARIANT.repo}@{MODEL_COMMIT[:12]}",
                                                       "lora": f"{VARIANT.lora_repo}@{LORA_COMMIT[:12]}"}
                assert output["model"]["safety_checker"]["model"] == CHECKER  # the baked checker screened it
                assert len(output["has_nsfw_concepts"]) == len(output["images"]) and output["timing"]["safety_ms"] > 0
                steps = sorted(e.body["output"]["step"] for e in queue.of("progress", job["id"]))
                assert steps == [1, 2, 3], (case["name"], steps)
            assert results["bad"]["error"].startswith("input.num_images: must be a whole number from 1 to 4")
            assert "Traceback" not in results["bad"]["error"]
            assert queue.of("ping"), "no heartbeat reached the queue"
            text = logs(built, name, chars=10**7)
            assert f"model source: baked /models/{VARIANT.name}" in text, text
            assert TESTS[0]["input"]["image"][-60:] not in text  # no picture in the log

    def test_serves_a_load_balancing_endpoint_with_endpoint_type_lb(self, built: Built) -> None:
        """ENDPOINT_TYPE=lb: the same image and CMD as a RunPod load-balancing endpoint, called with the openai
        package and requests; /ping on its own PORT_HEALTH goes 204 then 200."""
        port, health = free_port(), free_port()
        name = f"qwen-edit-test-{uuid.uuid4().hex[:10]}"
        env = {"ENDPOINT_TYPE": "lb", "PORT": str(port), "PORT_HEALTH": str(health), "LOG_LEVEL": "INFO"}
        built.daemon.docker("run", "-d", "--name", name, "--network", "host",
                            *(f"--env={k}={v}" for k, v in env.items()), built.full)
        try:
            seen: list[int] = []
            deadline = time.monotonic() + JOB_TIMEOUT
            while not seen or seen[-1] != 200:
                assert time.monotonic() < deadline, f"/ping saw {seen}; the log:\n{logs(built, name)}"
                try:
                    status = requests.get(f"http://127.0.0.1:{health}/ping", timeout=5).status_code
                except requests.ConnectionError:
                    status = 0
                if status and (not seen or seen[-1] != status):
                    seen.append(status)
                time.sleep(0.2)
            assert seen == [204, 200], seen
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=JOB_TIMEOUT)
            picture = base64.b64decode(TESTS[0]["input"]["image"].split(",", 1)[1])
            answer = client.images.edit(image=("in.png", picture, "image/png"), prompt="make the sky a sunset",
                                        size="256x256", model=VARIANT.repo, extra_body={"seed": 42})
            assert answer.data[0].b64_json and answer.size == "256x256", logs(built, name)
            assert base64.b64decode(answer.data[0].b64_json).startswith(b"\x89PNG")
            with pytest.raises(openai.BadRequestError) as bad:
                client.images.edit(image=("in.png", picture, "image/png"), prompt="x", n=9)
            assert bad.value.body["param"] == "n"
            done = requests.post(f"http://127.0.0.1:{port}/runsync", json={"input": TESTS[1]["input"]},
                                 timeout=JOB_TIMEOUT).json()
            assert done["status"] == "COMPLETED", done
            assert done["output"]["model"]["manifest"]["model"] == f"{VARIANT.repo}@{MODEL_COMMIT[:12]}"
            running = built.daemon.docker("inspect", "-f", "{{.State.Running}}", name).stdout.decode().strip()
            assert running == "true" and "Traceback" not in logs(built, name, chars=10**7)
        finally:
            built.daemon.docker("rm", "-f", name, check=False)

    def test_handler_test_input_inside_the_container(self, built: Built) -> None:
        job = json.dumps({"input": {**TESTS[0]["input"]}})
        run = run_once(built, built.full, "python", "handler.py", "--test_input", job)
        text = run.stdout.decode(errors="replace")
        assert run.returncode == 0, text[-4000:]
        assert f"{VARIANT.repo}@{MODEL_COMMIT[:12]}" in text  # the printed result names the baked model
        bad = json.dumps({"input": {**TESTS[0]["input"], "num_images": 9}})
        run = run_once(built, built.full, "python", "handler.py", "--test_input", bad)
        assert run.returncode != 0 and "input.num_images" in run.stdout.decode(errors="replace")

    def test_the_token_is_in_no_layer_nor_image_setting(self, built: Built) -> None:
        needle = built.token.encode()
        for image in (built.full, built.slim):
            for argv in (("image", "inspect", image), ("history", "--no-trunc", image)):
                assert needle not in built.daemon.docker(*argv).stdout, argv
        found = docker_env.found_in_save(built.daemon, [needle, MODEL_COMMIT.encode()], built.full, built.slim)
        assert needle not in found
        assert MODEL_COMMIT.encode() in found  # the search can fail: the baked manifest's commit is in a layer


class TestSlimImage:
    def test_bakes_only_the_lightning_lora_the_safety_checker_and_a_manifest(self, built: Built) -> None:
        found = run_once(built, "--entrypoint", "find", built.slim, "/models", "-type", "f").stdout.decode().split()
        assert sorted(found) == [f"/models/{VARIANT.name}/lightning/{VARIANT.lora_basename}",
                                 f"/models/{VARIANT.name}/manifest.json",
                                 *(f"/models/{VARIANT.name}/safety_checker/{name}" for name in (
                                     "config.json", "model.safetensors", "preprocessor_config.json"))]

    def test_answers_from_runpods_model_cache_at_runpod_volume(self, built: Built) -> None:
        volume = built.work / "runpod-volume"
        repo = volume / "huggingface-cache" / "hub" / ("models--" + VARIANT.repo.replace("/", "--"))
        for rel, data in built.model_files.items():
            (repo / "snapshots" / CACHE_COMMIT / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / "snapshots" / CACHE_COMMIT / rel).write_bytes(data)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(CACHE_COMMIT)
        with serve_queue() as queue, container(built, built.slim, queue, "-v", f"{volume}:/runpod-volume:ro") as name:
            body = answers(built, name, queue, [{"id": "cached", "input": TESTS[0]["input"]}])["cached"]
            assert "error" not in body, (body.get("error"), logs(built, name))
            model = body["output"]["model"]
            assert model["source"] == f"/runpod-volume/huggingface-cache/hub/{repo.name}/snapshots/{CACHE_COMMIT}"
            assert model["manifest"] == {"model": f"{VARIANT.repo}@{CACHE_COMMIT[:12]}",
                                         "lora": f"{VARIANT.lora_repo}@{LORA_COMMIT[:12]}"}
            assert model["safety_checker"]["model"] == CHECKER  # baked in the slim image, beside the LoRA
            assert "has_nsfw_concepts" in body["output"]

    def test_without_the_cache_every_job_gets_one_clear_error(self, built: Built) -> None:
        with serve_queue() as queue, container(built, built.slim, queue) as name:
            results = answers(built, name, queue, [{"id": f"j{n}", "input": TESTS[0]["input"]} for n in range(2)])
            errors = {body.get("error") for body in results.values()}
            assert len(errors) == 1, errors
            [error] = errors
            assert error.startswith(f"MODEL_PATH: /models/{VARIANT.name} holds only the Lightning LoRA"), error
            assert f"set the endpoint's Model field to {VARIANT.repo}" in error
            running = built.daemon.docker("inspect", "-f", "{{.State.Running}}", name).stdout.decode().strip()
            assert running == "true", logs(built, name)  # it stays up, answering every job at once

