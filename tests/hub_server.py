"""A small Hugging Face-compatible hub on loopback, for testing the bake script offline.

It speaks the part of the hub API that huggingface_hub's `model_info` and `hf_hub_download` use:
GET /api/models/{repo}/revision/{rev} (with sizes and LFS metadata), and HEAD/GET
/{repo}/resolve/{rev}/{path} (with X-Repo-Commit, ETag, X-Linked-Size, Range).  Repos can
require a token, and single files can be made to break off mid-download or report a false size.
Files are bytes in memory, or paths served from the disk (bench/bake's real-sized folders).
"""

from __future__ import annotations

import hashlib
import http.server
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from loopback import LoopbackServer


@dataclass
class Repo:
    files: dict[str, bytes | Path]  # a Path is served from the disk as it is asked for (real-sized files)
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # when set, requests need "Authorization: Bearer <token>"
    break_off: set[str] = field(default_factory=set)  # paths whose download stops half-way
    claimed_size: dict[str, int] = field(default_factory=dict)  # sizes to report instead of the real ones

    @classmethod
    def from_folder(cls, folder: Path, lazy: bool = False, **kwargs: object) -> Repo:
        """The folder's files, read now (or, `lazy`, served from the disk: bench/bake's real-shaped folders)."""
        files = {p.relative_to(folder).as_posix(): p if lazy else p.read_bytes() for p in folder.rglob("*")
                 if p.is_file()}
        return cls(files=files, **kwargs)  # type: ignore[arg-type]

    def size(self, name: str) -> int:
        data = self.files[name]
        return data.stat().st_size if isinstance(data, Path) else len(data)

    def etag(self, name: str) -> str:
        """The sha256 of the content (of its name, size and mtime for a file served from the disk: not read twice)."""
        data = self.files[name]
        if isinstance(data, Path):
            stat = data.stat()
            return hashlib.sha256(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        return hashlib.sha256(data).hexdigest()

    def read(self, name: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes [start, end) of a file, in pieces of at most 8 MiB."""
        data = self.files[name]
        if not isinstance(data, Path):
            yield data[start:end]
            return
        with data.open("rb") as handle:
            handle.seek(start)
            while start < end:
                piece = handle.read(min(8 * 1024**2, end - start))
                if not piece:
                    return
                start += len(piece)
                yield piece


class Hub(LoopbackServer):
    """Start with `with Hub(repos) as hub:`; `hub.url` is the HF_ENDPOINT to use."""

    METHODS = ("GET", "HEAD")
    PROTOCOL = "HTTP/1.1"

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        super().__init__()

    def serve(self, req: http.server.BaseHTTPRequestHandler) -> None:
        body = req.command != "HEAD"
        path = unquote(urlsplit(req.path).path)
        self.requests.append(f"{req.command} {path}")
        if path.startswith("/api/models/"):
            repo_id, _, revision = path.removeprefix("/api/models/").partition("/revision/")
            return self._info(req, repo_id, revision)
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(req, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        self._send(req, 404, b"not found", {"X-Error-Code": "EntryNotFound"})

    def _repo(self, req: http.server.BaseHTTPRequestHandler, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(req, 401, b"Repository not found", {"X-Error-Code": "RepoNotFound"})
            return None
        if repo.token is not None:
            auth = req.headers.get("Authorization", "")
            if not auth:
                self._send(req, 401, b"Access to this repo is restricted", {"X-Error-Code": "GatedRepo"})
                return None
            if auth != f"Bearer {repo.token}":
                self._send(req, 403, b"Forbidden: token refused", {})
                return None
        if revision not in ("main", repo.commit):
            self._send(req, 404, b"Revision not found", {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _info(self, req: http.server.BaseHTTPRequestHandler, repo_id: str, revision: str) -> None:
        repo = self._repo(req, repo_id, revision)
        if repo is None:
            return
        siblings = []
        for name in sorted(repo.files):
            size = repo.claimed_size.get(name, repo.size(name))
            item: dict[str, object] = {"rfilename": name, "size": size}
            if name.endswith(".safetensors"):
                item["lfs"] = {"sha256": repo.etag(name), "size": size, "pointerSize": 134}
            siblings.append(item)
        info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                "gated": repo.token is not None and "manual", "disabled": False, "siblings": siblings,
                "tags": [], "downloads": 0, "likes": 0, "lastModified": "2026-11-01T00:00:00.000Z"}
        self._send(req, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _file(self, req: http.server.BaseHTTPRequestHandler, repo_id: str, revision: str, name: str,
              body: bool) -> None:
        repo = self._repo(req, repo_id, revision)
        if repo is None:
            return
        if name not in repo.files:
            self._send(req, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound"})
            return
        size, etag = repo.size(name), repo.etag(name)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if name.endswith(".safetensors"):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start = 0
        ranged = req.headers.get("Range", "")
        if ranged.startswith("bytes=") and body:
            start = int(ranged[6:].split("-")[0] or 0)
        if not body:
            self._send(req, 200, b"", headers, length=size)
            return
        if name in repo.break_off:
            req.send_response(200)
            for key, value in headers.items():
                req.send_header(key, value)
            req.send_header("Content-Length", str(size))
            req.end_headers()
            for piece in repo.read(name, 0, size // 2):
                req.wfile.write(piece)
            req.wfile.flush()
            req.close_connection = True
            return
        if start:
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        req.send_response(206 if start else 200)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(size - start))
        req.end_headers()
        for piece in repo.read(name, start, size):
            req.wfile.write(piece)

    @staticmethod
    def _send(req: http.server.BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str],
              length: int | None = None) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(payload) if length is None else length))
        req.end_headers()
        if payload:
            req.wfile.write(payload)


SAFETY_CHECKER_REPO = "Falconsai/nsfw_image_detection"
SAFETY_CHECKER_COMMIT = "4ea924a80cd71a53597a14eead839aff6942f2c9"  # what the loopback hub's main resolves to
SAFETY_CHECKER_JUNK = {"pytorch_model.bin": b"pickle: a duplicate format", "optimizer.pt": b"training state",
                       "README.md": b"# card"}


def safety_checker_repo(folder: Path, labels: tuple[str, str] = ("normal", "nsfw")) -> Repo:
    """A tiny random ViT classifier laid out as Falconsai/nsfw_image_detection is (config.json,
    model.safetensors, preprocessor_config.json, and files the bake must skip), served at the pinned
    commit (and main, resolving to it): a bake that asks for any other revision gets a 404."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=224, patch_size=16, id2label=dict(enumerate(labels)),
                       label2id={name: index for index, name in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
         "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
         "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}))
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return Repo(files=files | SAFETY_CHECKER_JUNK, commit=SAFETY_CHECKER_COMMIT)
