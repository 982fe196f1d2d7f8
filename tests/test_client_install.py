"""`pip install ./client` into a fresh virtual environment, as a user on a laptop would: it must
install the `qwen-edit` command and only what the client uses (no torch, no diffusers, no CUDA
libraries).  Before, the client shipped inside the worker package and pulled in gigabytes.  The installed
`qwen-edit deploy --dry-run` then runs against the loopback fake of RunPod's REST API (tests/runpod_rest.py):
its package data (the deploy table, the smoke job) came along, and its bodies pass RunPod's schema.

Needs a package index (PyPI, or the one pip is configured with); skipped, saying so, only when
that index cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runpod_rest import FakeRunPodApi, problems

ROOT = Path(__file__).resolve().parent.parent
# requests and its dependencies, tqdm, simpy, the client itself, and the venv's own pip/setuptools
ALLOWED = {"qwen-edit-client", "requests", "urllib3", "idna", "certifi", "charset-normalizer", "tqdm", "simpy",
           "pip", "setuptools", "wheel"}


def run(*command: str | Path, timeout: float = 600,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(900)
def test_pip_install_client_into_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    probe = run(python, "-m", "pip", "download", "--no-deps", "--dest", tmp_path / "probe", "simpy==4.1.2",
                timeout=180)
    if probe.returncode != 0:
        pytest.skip(f"the package index (PyPI) cannot be reached: {probe.stderr.strip()[-300:]}")
    source = tmp_path / "client"  # a copy, so pip's build/ folder is not written into the repository
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    started = time.monotonic()
    install = run(python, "-m", "pip", "install", source)
    seconds = time.monotonic() - started
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    print(f"pip install ./client took {seconds:.1f} s")  # shown with -s; a figure, not a limit

    helped = run(venv / "bin" / "qwen-edit", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "edit" in helped.stdout and "cost" in helped.stdout and "plan" in helped.stdout
    plan = run(venv / "bin" / "qwen-edit", "plan", "--burst", "3", "--json")
    assert plan.returncode == 0, plan.stderr
    key = "rpa_install_test_key"
    with FakeRunPodApi(key=key) as api:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
        env.update(RUNPOD_API_KEY=key, RUNPOD_API_URL=api.url)
        deployed = run(venv / "bin" / "qwen-edit", "deploy", "--image", "registry.example/you/qwen:2511", "--gpu-class",
                       "24", "--dry-run", "--json", env=env, timeout=120)
    assert deployed.returncode == 0, deployed.stderr
    assert key not in deployed.stdout + deployed.stderr
    calls = json.loads(deployed.stdout.strip().splitlines()[-1])["requests"]
    assert [c["method"] for c in calls] == ["GET", "GET", "POST"] and not api.invalid and not api.bad_answers
    assert problems("#/components/schemas/CreateEndpointRequest", calls[-1]["body"]) == []
    assert "GPU_PRICES" in calls[-1]["body"]["env"] and not [b for m, _, b in api.bodies if m != "GET"]

    listed = run(python, "-m", "pip", "list", "--format=freeze")
    installed = {line.split("==")[0].lower().replace("_", "-") for line in listed.stdout.split() if "==" in line}
    assert "torch" not in installed and "diffusers" not in installed
    assert not [name for name in installed if name.startswith("nvidia-")]
    assert installed <= ALLOWED, f"unexpected packages: {sorted(installed - ALLOWED)}"
    assert run(python, "-c", "import torch").returncode != 0
