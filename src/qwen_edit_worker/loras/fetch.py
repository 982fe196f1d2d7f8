"""Turning a job's `input.loras` into checked files on disk, in the job's input stage.

Why this exists: fetching is slow (a new LoRA is a download) and must not hold the GPU, so it
runs before the job asks for the GPU section: with CONCURRENCY=2 the next job's LoRA downloads
while the current job edits.  Each item becomes a `Fetched`: a whole safetensors file whose header
was checked (pictures/urlfetch.py's SSRF guard for URLs, loras/hub.py for Hugging Face, LORA_DIR
for names), held in the cache until the job ends.  Two jobs asking for one new source at once
share one download (`_flight`).  Every failure is a RequestError naming the item's path.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RequestError
from ..pictures import urlfetch
from . import hub
from .cache import LoraCache
from .request import LoraItem
from .safefile import Header, SafetensorsProblem, check_file

log = logging.getLogger(__name__)
DOWNLOAD_TIMEOUT_S = 600.0  # a whole LoRA download (2 GB at ~30 MB/s is about a minute)
HASH_CHUNK = 1 << 20


class _Failed(Exception):
    """A fetch failed; the message is for the caller, prefixed with the item's field by the job."""


@dataclass
class Fetched:
    """One LoRA of a job, on disk and checked; `layers` is filled in when it is activated."""

    item: LoraItem
    sha256: str
    file: Path
    cached: bool  # the file was on this worker's disk before the job (LORA_DIR names always are)
    declared_layers: int
    layers: int = 0
    release: Callable[[], None] = field(default=lambda: None, repr=False)

    def report(self) -> dict[str, Any]:
        """The item of the output's `model.loras`."""
        return {"path": self.item.shown_path, "scale": self.item.scale, "sha256": self.sha256[:12],
                "layers": self.layers, "source": self.item.source.kind, "cached": self.cached}


class LoraFetcher:
    """Fetches LoRAs for jobs; one per worker (it owns the cache and the in-flight downloads)."""

    def __init__(self, cache: LoraCache, *, max_bytes: int, lora_dir: Path | None, allow_loopback: bool,
                 hf_endpoint: str, hf_token: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
        self.cache = cache
        self.max_bytes = max_bytes
        self.lora_dir = lora_dir
        self.policy = urlfetch.FetchPolicy(max_bytes, allow_loopback, limit_setting="LORA_MAX_BYTES",
                                           what="LoRA file", total_timeout_s=timeout_s, accept="*/*")
        self.hf_endpoint = hf_endpoint
        self.hf_token = hf_token
        self.downloads = 0  # downloads started (tests and the benchmark read it)
        self._lock = threading.Lock()
        self._flights: dict[str, Future[tuple[str, Path]]] = {}
        self._local_sha: dict[tuple[str, int, int], str] = {}

    def fetch_all(self, items: tuple[LoraItem, ...]) -> list[Fetched]:
        """Fetch every item in order; on a failure release what was fetched and raise RequestError."""
        fetched: list[Fetched] = []
        try:
            for item in items:
                try:
                    fetched.append(self.fetch(item))
                except _Failed as err:
                    raise RequestError(f"{item.field}.path", str(err)) from None
        except BaseException:
            for done in fetched:
                done.release()
            raise
        return fetched

    def fetch(self, item: LoraItem) -> Fetched:
        if item.source.kind == "local":
            return self._local(item)
        key = item.source.key
        found = self.cache.lookup(key)
        cached = found is not None
        if found is None:
            found = self._flight(key, lambda: self._download(item))
        sha, file = found
        try:
            layers = _check(file).lora_layers  # a cached file is checked again: disks and people change files
        except BaseException:
            self.cache.release(sha)
            raise
        return Fetched(item, sha, file, cached, layers, release=lambda: self.cache.release(sha))

    def _flight(self, key: str, download: Callable[[], tuple[str, Path]]) -> tuple[str, Path]:
        """Run `download` once for concurrent askers of one key; each gets the file held for it."""
        with self._lock:
            future = self._flights.get(key)
            leader = future is None
            if future is None:
                future = self._flights[key] = Future()
        if leader:
            try:
                future.set_result(download())
            except BaseException as err:
                future.set_exception(err)
            finally:
                with self._lock:
                    del self._flights[key]
            return future.result()  # the leader's hold comes from cache.add
        sha, _ = future.result()  # raises the leader's error for the followers too
        again = self.cache.lookup(key)  # a hold of this job's own
        if again is None or again[0] != sha:
            raise _Failed("the file was evicted from the LoRA cache before it could be used; retry")
        return again

    def _download(self, item: LoraItem) -> tuple[str, Path]:
        source = item.source
        partial = self.cache.new_partial()
        with self._lock:
            self.downloads += 1
        try:
            if source.kind == "url":
                with partial.open("wb") as out:
                    urlfetch.fetch_to_file(source.url, self.policy, out)
            else:
                hub.download(source, self.hf_endpoint, self.hf_token, self.max_bytes, partial)
            _check(partial)
            sha = _sha256(partial)
            log.info("LoRA %s fetched (%s, %d bytes)", sha[:12], source.kind, partial.stat().st_size)
            return sha, self.cache.add(source.key, partial, sha)
        except BaseException as err:  # nothing half-written stays behind, whatever went wrong
            partial.unlink(missing_ok=True)
            failed = _download_failure(err)
            if failed is None:
                raise
            raise failed from None

    def _local(self, item: LoraItem) -> Fetched:
        if self.lora_dir is None:
            raise _Failed("a LoRA name needs LORA_DIR (a folder of .safetensors files), which this worker does "
                          "not have; give an https URL or a Hugging Face ORG/NAME/FILE.safetensors")
        folder = self.lora_dir.resolve()
        path = (folder / item.source.filename).resolve()
        if path.parent != folder:  # a symlink out of the folder
            raise _Failed(f"{item.source.filename} points outside LORA_DIR")
        if not path.is_file():
            names = sorted(p.name for p in folder.glob("*.safetensors"))[:8] if folder.is_dir() else []
            raise _Failed(f"no {item.source.filename} in LORA_DIR (it has: {', '.join(names) or 'nothing'})")
        stat = path.stat()
        if stat.st_size > self.max_bytes:
            raise _Failed(f"{path.name} is {stat.st_size:,} bytes, over the {self.max_bytes:,}-byte limit "
                          "(LORA_MAX_BYTES)")
        layers = _check(path).lora_layers
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        sha = self._local_sha.get(memo) or _sha256(path)
        self._local_sha[memo] = sha
        return Fetched(item, sha, path, True, layers)


def _download_failure(err: BaseException) -> _Failed | None:
    """The caller-facing failure for a download's error, or None for one to pass on as it is."""
    if isinstance(err, _Failed):
        return err
    if isinstance(err, urlfetch.FetchError):
        return _Failed(f"cannot fetch the LoRA: {err}")
    if isinstance(err, hub.HubError):
        return _Failed(f"cannot fetch the LoRA from the hub: {err}")
    if isinstance(err, OSError):  # writing it: the cache disk is full or gone
        return _Failed(f"cannot store the LoRA in LORA_CACHE_DIR ({err.strerror or type(err).__name__})")
    return None


def _check(path: Path) -> Header:
    try:
        header = check_file(path)
    except SafetensorsProblem as err:
        raise _Failed(f"not a usable LoRA: {err}") from None
    if header.lora_layers == 0:
        raise _Failed("not a usable LoRA: the file has no LoRA weights (no lora_down/lora_A tensors)")
    return header


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
