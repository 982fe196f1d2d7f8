"""The wheels the GPU machine lacks, gathered here and carried there (it reaches no registry).

Why this exists: the lent GPU machine has torch 2.11 (CUDA 13.0) in its python3 3.12 and many
packages, but not diffusers, torchao, xformers or runpod, and some of its versions differ from
builder/requirements.txt.  What it lacks travels as wheels in the carried folder (64 MiB at most,
the working tree included), downloaded here with `pip download --no-deps` for CPython 3.12 on
manylinux x86-64 (the device README's recipe), and installed there with `pip install --no-index
--no-deps --target`.  Each row says why it travels; torch itself stays the device's (2.11).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# (name, version, why it travels).  Versions are builder/requirements.txt's pins and, for runpod's
# own needs, the versions pip resolved beside them in this project's environment.
WHEELS: tuple[tuple[str, str, str], ...] = (
    ("diffusers", "0.42.1", "not on the device"),
    ("torchao", "0.18.0", "not on the device (PRECISION int8/fp8)"),
    ("xformers", "0.0.35", "not on the device (ATTENTION_BACKEND xformers)"),
    ("nvidia-cuda-runtime-cu12", "12.8.90", "libcudart.so.12 for xformers (the device's CUDA runtime is 13)"),
    ("transformers", "5.23.0", "pinned; the device has 5.17.0"),
    ("tokenizers", "0.23.3", "pinned; the device has 0.23.2"),
    ("huggingface-hub", "2.4.0", "pinned; the device has 1.33.0"),
    ("httpx2", "2.16.2", "huggingface-hub 2.4's HTTP client, not on the device"),
    ("httpcore2", "2.16.2", "httpx2's transport, not on the device"),
    ("truststore", "0.10.5", "httpx2's certificates, not on the device"),
    ("peft", "0.21.2", "pinned; the device's version is not recorded"),
    ("pybase64", "1.5.1", "not on the device (the worker's base64 in and out)"),
    ("isal", "1.9.1", "not on the device (the worker's PNG deflate)"),
    ("runpod", "1.12.0", "not on the device (handler.py)"),
    ("aiohttp-retry", "2.9.1", "imported by runpod, not on the device"),
    ("backoff", "2.2.1", "imported by runpod, not on the device"),
    ("tomli", "2.5.0", "imported by runpod, not on the device"),
    ("tomlkit", "0.15.2", "imported by runpod, not on the device"),
    ("tqdm-loggable", "0.4.1", "imported by runpod, not on the device"),
    ("paramiko", "5.1.0", "imported by runpod, not on the device"),
    ("invoke", "3.0.3", "paramiko's, not on the device"),
    ("bcrypt", "5.0.0", "paramiko's, not on the device"),
    ("pynacl", "1.6.2", "paramiko's, not on the device"),
    ("cryptography", "50.0.2", "paramiko's, not on the device"),
    ("cffi", "2.1.1", "cryptography's and pynacl's, not on the device"),
    ("pycparser", "3.12", "cffi's, not on the device"),
)
# Left out on purpose, with the reason (printed by --dry-run).
NOT_CARRIED: tuple[tuple[str, str], ...] = (
    ("torch, torchvision", "the device's 2.11.0+cu130 and 0.26.0 are used (a torch wheel is ~900 MB)"),
    ("flash-attn", "PyPI has a source distribution only (a build needs nvcc and about an hour): `flash` is "
                   "measured as unusable unless a wheel is carried"),
    ("numpy, pillow, safetensors, accelerate", "on the device (numpy 2.5.2, safetensors 0.8.0, accelerate 1.15.0)"),
    ("boto3, fastapi, uvicorn", "runpod imports them only for uploads and the local API, which the session "
                                "does not use"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
CARRY_LIMIT_BYTES = 64 * 1024**2


def download_command(folder: Path, python: str = sys.executable) -> list[str]:
    """`pip download` of every wheel in WHEELS for the device's CPython 3.12 on manylinux x86-64."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    return [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *platforms, "-d", str(folder), *(f"{n}=={v}" for n, v, _ in WHEELS)]


def install_command(folder: Path, target: Path, python: str = "python3") -> list[str]:
    """The device-side install: carried wheels only, no index, into `target` (then on PYTHONPATH)."""
    return [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", str(target), *(str(p) for p in sorted(folder.glob("*.whl")))]


def gather(folder: Path, dry_run: bool) -> int:
    """Download the wheels into `folder` (or, with dry_run, list them); return the exit status."""
    print(f"# wheels for the device (CPython 3.12, manylinux x86-64) into {folder}:")
    for name, version, why in WHEELS:
        print(f"  {name}=={version}  ({why})")
    for name, why in NOT_CARRIED:
        print(f"  not carried: {name}: {why}")
    print("# command: " + " ".join(download_command(folder)))
    if dry_run:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    status = subprocess.run(download_command(folder), check=False).returncode
    total = sum(p.stat().st_size for p in folder.glob("*.whl"))
    print(f"# {len(list(folder.glob('*.whl')))} wheels, {total / 1024**2:.1f} MiB "
          f"(the carry limit is {CARRY_LIMIT_BYTES / 1024**2:.0f} MiB with the working tree)")
    if total > CARRY_LIMIT_BYTES:
        print("# over the carry limit: drop wheels before a device run")
        return status or 1
    return status
