"""The LoRA disk cache: downloaded files kept by content, least recently used out past a limit.

Why this exists: a LoRA is tens of megabytes to gigabytes, and callers repeat the same few, so a
worker downloads each once.  Files are stored by their sha256 (`blobs/<sha256>.safetensors`): two
URLs of one file (signed URLs differ in their query) take the space once.  `index.json` maps each
source to its file; its keys are sha256 digests of the source, never the URL itself, because signed
URLs carry credentials.  A download is written to `partial/` and renamed into `blobs/` only once it
is whole and checked, so a broken download never enters the cache.  Past the byte limit the least
recently used files go, except those a job in progress holds (from `lookup`/`add` to `release`).  Thread-safe;
one worker process owns a cache folder.  Pure: no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def source_digest(key: str) -> str:
    """The index's name for a source: its sha256, so no URL (or its signature) is written to disk."""
    return hashlib.sha256(key.encode()).hexdigest()


class LoraCache:
    """Content-addressed files under `root`, at most `max_bytes` of them (LRU)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        for leftover in self.partial.iterdir():  # from a worker that stopped mid-download
            _remove(leftover)
        self._sources, self._files = self._read_index()

    def lookup(self, key: str) -> tuple[str, Path] | None:
        """(sha256, file) of a cached source, marked as used and held (call `release`); None if not cached."""
        with self._lock:
            sha = self._sources.get(source_digest(key))
            if sha is None or not self.path(sha).is_file():
                return None
            self._files[sha]["used"] = time.time()
            self._held[sha] += 1
            self._write_index()
            return sha, self.path(sha)

    def path(self, sha: str) -> Path:
        return self.blobs / f"{sha}.safetensors"

    def new_partial(self) -> Path:
        """A fresh file name in `partial/` for a download in progress (the caller removes it on failure)."""
        handle, name = tempfile.mkstemp(dir=self.partial, suffix=".part")
        os.close(handle)
        return Path(name)

    def add(self, key: str, partial: Path, sha: str) -> Path:
        """Move a whole, checked download into the cache under its sha256 (held: call `release`); evict."""
        with self._lock:
            target = self.path(sha)
            os.replace(partial, target)
            self._sources[source_digest(key)] = sha
            self._files[sha] = {"bytes": target.stat().st_size, "used": time.time()}
            self._held[sha] += 1
            self._evict()
            self._write_index()
            return target

    def release(self, sha: str) -> None:
        with self._lock:
            self._held[sha] -= 1
            if self._held[sha] <= 0:
                del self._held[sha]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(int(entry["bytes"]) for entry in self._files.values())

    def _evict(self) -> None:
        total = sum(int(entry["bytes"]) for entry in self._files.values())
        for sha in sorted(self._files, key=lambda s: self._files[s]["used"]):
            if total <= self.max_bytes:
                break
            if self._held[sha]:
                continue
            total -= int(self._files.pop(sha)["bytes"])
            self._sources = {k: v for k, v in self._sources.items() if v != sha}
            _remove(self.path(sha))
            log.info("LoRA cache: evicted %s (least recently used; LORA_CACHE_GB)", sha[:12])

    def _read_index(self) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
        try:
            index = json.loads((self.root / "index.json").read_text())
            sources, files = dict(index["sources"]), dict(index["files"])
        except (OSError, ValueError, KeyError, TypeError):
            sources, files = {}, {}
        files = {sha: entry for sha, entry in files.items() if self.path(sha).is_file()}
        for blob in self.blobs.iterdir():  # files the index does not know (an index lost mid-write)
            if blob.name.removesuffix(".safetensors") not in files:
                _remove(blob)
        return {k: v for k, v in sources.items() if v in files}, files

    def _write_index(self) -> None:
        temporary = self.root / f"index.{os.getpid()}.{threading.get_ident()}.tmp"
        temporary.write_text(json.dumps({"sources": self._sources, "files": self._files}))
        os.replace(temporary, self.root / "index.json")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
