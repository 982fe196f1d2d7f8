"""What the bake downloads, whether the disk can take it, and the downloads overlapping the preparation.

Why this exists: preparing after the whole 58 GB download made the bake's time the download's plus the
preparation's, and its disk each rewritten component twice.  Here the files the pipeline loads
(`select_files`) download in parallel as huggingface_hub's own `snapshot_download` does it
(`hf_hub_download` per file in a pool of threads, Xet where the repo has it and hf_xet is installed),
and the main thread prepares each shard of a rewritten component the moment it is there, in the order
the preparation takes them (`download_and_prepare`, `prepare_shard`: checked whole first).  At most
`AHEAD` of those shards are downloaded beyond the one being prepared, and each is deleted once
prepared, so the disk holds the final folder plus `AHEAD + 1` input shards (`check_disk` asks for that
before anything large is downloaded).  On any failure the downloads not yet started are cancelled and
those in flight are let finish (a download cannot be interrupted), so that nothing writes into the
staging folder after bake.py removes it.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from verify import BakeError, safetensors_problem

from qwen_edit_worker.weights import prepare as preparing

log = logging.getLogger("bake")
WEIGHT_FORMATS_SKIPPED = (".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5", ".gguf", ".pb")
SKIPPED = ("*.md", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", ".gitattributes", "*.mp4")
FREE_SPACE_MARGIN = 512 * 1024**2  # also covers the safety checker (343 MB)
WORKERS = 8  # snapshot_download's default
AHEAD = 2  # rewritten shards downloaded beyond the one being prepared


def download_and_prepare(fetch: Callable[[str], Path], plain: Sequence[str], streamed: Sequence[str],
                         prepare: Callable[[str, Path], None], ahead: int = AHEAD, workers: int = WORKERS) -> None:
    """Download `plain` and `streamed` (repo paths) with `fetch`; hand each of `streamed`, in order, to `prepare`.

    `fetch(path)` downloads one file and returns where it is; `prepare(path, local)` prepares one shard (and
    removes it).  The first error raised by either ends the whole: the pool is drained, then it is re-raised.
    """
    if ahead < 0:
        raise ValueError(f"ahead must be 0 or more, not {ahead}")
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
    waiting: dict[str, Future[Path]] = {}
    others: list[Future[Path]] = []
    try:
        for path in streamed[: ahead + 1]:  # first in the queue: the preparation waits for them
            waiting[path] = pool.submit(fetch, path)
        others = [pool.submit(fetch, path) for path in plain]
        for number, path in enumerate(streamed):
            local = waiting.pop(path).result()
            prepare(path, local)
            following = number + ahead + 1
            if following < len(streamed):
                waiting[streamed[following]] = pool.submit(fetch, streamed[following])
        for future in others:
            future.result()
    except BaseException:
        for future in [*waiting.values(), *others]:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def select_files(files: dict[str, int], model_index: dict[str, Any],
                 shard_maps: dict[str, dict[str, str]]) -> list[str]:
    """The files of a diffusers repo that the pipeline loads: configs, tokenizers, used safetensors.

    `files` maps repo paths to sizes; `shard_maps` maps each *.safetensors.index.json to its weight_map.
    """
    components = [name for name, spec in model_index.items()
                  if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None]
    chosen = ["model_index.json"]
    for component in components:
        inside = sorted(p for p in files if p.startswith(f"{component}/") and p.count("/") == 1)
        weights = [p for p in inside if p.endswith(".safetensors")]
        chosen += [p for p in inside if not p.endswith(".safetensors") and not p.endswith(WEIGHT_FORMATS_SKIPPED)
                   and not any(fnmatch.fnmatch(p.rsplit("/", 1)[1], pattern) for pattern in SKIPPED)]
        chosen += _used_weights(component, weights, files, shard_maps)
    return sorted(set(chosen))


def _used_weights(component: str, weights: list[str], files: dict[str, int],
                  shard_maps: dict[str, dict[str, str]]) -> list[str]:
    indexes = sorted(p for p in files if p.startswith(f"{component}/") and p.endswith(".safetensors.index.json"))
    plain_indexes = [p for p in indexes if p.rsplit("/", 1)[1].count(".") == 3]  # no ".fp16." variant part
    if indexes:
        index_path = (plain_indexes or indexes)[0]
        return [f"{component}/{shard}" for shard in sorted(set(shard_maps[index_path].values()))]
    plain = [p for p in weights if p.rsplit("/", 1)[1].count(".") == 1]
    return plain or weights


def check_disk(dest: Path, staging: Path, files: list[str], sizes: dict[str, int], lora_bytes: int,
                rewritten: list[str], fuse: bool, precision: str, text_encoder_precision: str) -> None:
    """BakeError(4) unless `dest` holds the bake at its largest: the final folder plus the shards in flight."""
    kept = sum(sizes[p] for p in files if p.split("/", 1)[0] not in rewritten or not p.endswith(".safetensors"))
    try:
        planned = preparing.estimate_bytes(staging, precision, text_encoder_precision, fuse) if rewritten else {}
    except preparing.PrepareError as err:
        raise BakeError(7, str(err)) from None
    shards = sorted((sizes[p] for p in files if p.split("/", 1)[0] in rewritten and p.endswith(".safetensors")),
                    reverse=True)
    total = kept + sum(planned.values()) + sum(shards[: AHEAD + 1]) + lora_bytes
    free = shutil.disk_usage(dest).free
    if total + FREE_SPACE_MARGIN > free:
        raise BakeError(4, f"the bake needs {total / 1e9:.1f} GB at its largest and {dest} has {free / 1e9:.1f} GB "
                           "free; give the build more disk")
    log.info("disk: %.2f GB needed at most (the final folder%s), %.1f GB free", total / 1e9,
             f" and {min(len(shards), AHEAD + 1)} shards being prepared" if shards else "", free / 1e9)


def prepare_shard(preparation: Any, path: str, local: Path) -> None:
    """Check one downloaded shard and prepare it (exit codes: 6 damaged, 4 disk full, 7 preparation failed)."""
    problem = safetensors_problem(local)
    if problem:
        raise BakeError(6, f"{path}: {problem}")
    with preparing_errors(f"preparing {path}"):
        preparation.add(local)


@contextmanager
def preparing_errors(doing: str) -> Iterator[None]:
    """A preparation's errors as bake.py's: PrepareError exit 7, a full disk exit 4 (`doing` names the step)."""
    try:
        yield
    except preparing.PrepareError as err:
        raise BakeError(7, str(err)) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise BakeError(4, f"the disk filled up while {doing}; give the build more disk") from None
        raise
