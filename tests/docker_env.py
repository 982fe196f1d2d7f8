"""Docker for the image test: the tools from the OS packages, a private daemon, a Debian stand-in base.

Why this exists: the worker ships as a Docker image, so a test must build the unmodified Dockerfile
and run the image as RunPod does.  No container registry is reachable here (facts.md section 10):
the CUDA base cannot be pulled, so a Debian root made with debootstrap (Python, venv, the host's CA
certificates, so TLS inside the build trusts what the host trusts) stands in through CUDA_IMAGE.

- `why_docker_cannot_run()` is the one reason to skip (not Linux, not root, no apt to install with).
- `Daemon` is a private `dockerd` (own data-root, exec-root and socket, overlay2, no bridge or
  iptables: builds and containers use the host network), started as this process's child in its
  own process group and ended by that id, also when a test fails.
- Everything worth keeping between runs on one machine lives in CACHE (the daemon's data-root with
  its layers and build cache, the debootstrap root): a warm run rebuilds only what changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

CACHE = Path(os.environ.get("QWEN_EDIT_IMAGE_CACHE", "/var/cache/qwen-edit-image-test"))
DOCKER = "/usr/bin/docker"  # Debian's docker.io client (20.10): BuildKit with the built-in frontend
TOOLS = {DOCKER: "docker.io", "/usr/sbin/dockerd": "docker.io", "/usr/sbin/debootstrap": "debootstrap"}
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
HOST_CAS = Path("/usr/local/share/ca-certificates")


def why_docker_cannot_run() -> str | None:
    """Why this machine cannot build and run the image (then the test skips, saying so), else None."""
    if not sys.platform.startswith("linux"):
        return f"the image test needs Linux to run Docker (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the image test needs root to start its own Docker daemon (run `make test` as root)"
    missing = sorted({package for path, package in TOOLS.items() if not Path(path).exists()})
    if missing and shutil.which("apt-get") is None:
        return f"the image test needs {', '.join(missing)} and there is no apt-get to install them with"
    return None


def install_tools(log: Path) -> None:
    """Install docker.io and debootstrap from the OS packages where missing (about 15 s)."""
    missing = sorted({package for path, package in TOOLS.items() if not Path(path).exists()})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("ab") as out:
        for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
            subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=True, timeout=900)


class Daemon:
    """A private dockerd; `docker(...)` runs the client against it.  Use as a context manager."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = data_root
        self.run_dir = Path(tempfile.mkdtemp(prefix="qd-", dir="/tmp"))  # short: socket paths are limited
        self.socket = self.run_dir / "docker.sock"
        self.log = self.run_dir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1",
                    "DOCKER_CONFIG": str(self.run_dir / "client")}

    def __enter__(self) -> Daemon:
        self.data_root.mkdir(parents=True, exist_ok=True)
        _stop_leftover(self.data_root / ".test-dockerd.pid")
        argv = ["/usr/sbin/dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
                "--pidfile", str(self.run_dir / "dockerd.pid"), "-H", f"unix://{self.socket}",
                "--storage-driver=overlay2", "--bridge=none", "--iptables=false", "--ip-masq=false"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        (self.data_root / ".test-dockerd.pid").write_text(str(self.process.pid))
        try:
            deadline = time.monotonic() + 60
            while self.docker("version", check=False, timeout=10).returncode != 0:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not start (exit {self.process.poll()}):\n{self.tail()}")
                time.sleep(0.3)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def docker(self, *args: str, check: bool = True, timeout: float = 600, stdout: object = subprocess.PIPE
               ) -> subprocess.CompletedProcess[bytes]:
        out = subprocess.run([DOCKER, *args], env=self.env, stdout=stdout, stderr=subprocess.STDOUT,
                             timeout=timeout)
        if check and out.returncode != 0:
            text = out.stdout.decode(errors="replace")[-4000:] if isinstance(out.stdout, bytes) else ""
            raise RuntimeError(f"docker {' '.join(args[:3])} ... exited {out.returncode}:\n{text}")
        return out

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containers and its containerd), then SIGKILL its process group."""
        if self.process is not None:
            _end_group(self.process.pid, self.process.wait)
            (self.data_root / ".test-dockerd.pid").unlink(missing_ok=True)
            self.process = None
        for mount_point in _mounts_under(self.run_dir):  # dockerd leaves its netns bind mount behind
            subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=60)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _mounts_under(folder: Path) -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    points = [line.split()[1] for line in lines if len(line.split()) > 1]
    return sorted((p for p in points if p.startswith(f"{folder}/")), reverse=True)


def _end_group(pid: int, wait: object) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        wait(timeout=60)  # type: ignore[operator]
    except (ProcessLookupError, ChildProcessError):
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever is left of its group (containerd, shims)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        wait(timeout=30)  # type: ignore[operator]
    except (ChildProcessError, subprocess.TimeoutExpired):
        pass


def _stop_leftover(pidfile: Path) -> None:
    """A daemon an earlier run of this test started on the same data-root and could not end (killed)."""
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    if cmdline and cmdline[0].endswith(b"dockerd") and str(pidfile.parent).encode() in cmdline:

        def wait(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)

        _end_group(pid, wait)
    pidfile.unlink(missing_ok=True)


def base_image(daemon: Daemon, log: Path) -> str:
    """The Debian stand-in for the CUDA base, imported into the daemon; the debootstrap root is cached."""
    root = CACHE / f"debootstrap-{SUITE}"
    if not (root / "usr" / "bin" / "python3").exists():
        partial = CACHE / f".debootstrap-{SUITE}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with log.open("ab") as out:  # about 70 s and 300 MB; python3 is Debian 12's 3.11
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,"
                            "ca-certificates", SUITE, str(partial), MIRROR], stdout=out, stderr=subprocess.STDOUT,
                           check=True, timeout=1800)
        partial.replace(root)
    certificates = sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in certificates)).hexdigest()[:12]
    name = f"qwen-edit-test-base:{SUITE}-{digest}"
    if daemon.docker("image", "inspect", name, check=False).returncode == 0:
        return name
    target = root / "usr" / "local" / "share" / "ca-certificates"
    for old in target.glob("*.crt"):
        old.unlink()
    for cert in certificates:
        shutil.copy2(cert, target / cert.name)
    subprocess.run(["chroot", str(root), "update-ca-certificates", "--fresh"], check=True, capture_output=True,
                   timeout=300)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    try:
        imported = subprocess.run([DOCKER, "import", "-", name], env=daemon.env, stdin=tar.stdout,
                                  capture_output=True, timeout=600)
    finally:
        tar.wait(timeout=60)
    if imported.returncode != 0 or tar.returncode != 0:
        raise RuntimeError(f"importing the stand-in base failed: {imported.stderr.decode(errors='replace')}")
    return name


def build(daemon: Daemon, tag: str, context: Path, log: Path, build_args: dict[str, str],
          secrets: Iterable[str] = ()) -> float:
    """`docker build` of the Dockerfile as it is, only build args changed; returns the seconds it took."""
    argv = ["build", "--network", "host", "--progress", "plain", "-t", tag]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    for secret in secrets:
        argv += ["--secret", secret]
    started = time.monotonic()
    with log.open("ab") as out:
        done = daemon.docker(*argv, str(context), check=False, timeout=3000, stdout=out)
    if done.returncode != 0:
        raise RuntimeError(f"docker build -t {tag} failed (exit {done.returncode}):\n"
                           f"{log.read_text(errors='replace')[-5000:]}")
    return time.monotonic() - started


def found_in_save(daemon: Daemon, needles: Iterable[bytes], *images: str) -> set[bytes]:
    """Which `needles` occur anywhere in `docker save` of the images (every layer's files, the configs);
    one pass over the stream (about a minute for 6.6 GB), nothing written to disk."""
    wanted = set(needles)
    overlap = max(map(len, wanted)) if wanted else 0
    process = subprocess.Popen([DOCKER, "save", *images], env=daemon.env, stdout=subprocess.PIPE)
    assert process.stdout is not None
    found: set[bytes] = set()
    tail, total = b"", 0
    try:
        while chunk := process.stdout.read(16 * 1024 * 1024):
            total += len(chunk)
            window = tail + chunk
            found |= {needle for needle in wanted - found if needle in window}
            tail = chunk[-overlap:]
    finally:
        process.stdout.close()
        code = process.wait(timeout=600)
    if code != 0 or total == 0:
        raise RuntimeError(f"docker save {' '.join(images)} failed (exit {code}, {total} bytes read)")
    return found
