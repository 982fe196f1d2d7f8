"""`qwen-edit edit`: send each picture (file, folder or URL) as one job, save what comes back.

Why this exists: people edit folders of pictures from their own machine and need a record of what
each edit cost.  Each input becomes one job (at most --concurrency at once); the edited pictures
are saved as `<input name>-seed<seed>.<format>` in the output folder, and every finished job,
COMPLETED or FAILED, is appended to a JSON Lines log that `qwen-edit cost` reads.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from tqdm import tqdm

from .endpoint import EndpointClient, EndpointError

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_REQUEST_BYTES = {"run": 10_000_000, "runsync": 20_000_000}  # RunPod's payload limits


@dataclass(frozen=True)
class Source:
    name: str  # file stem or the URL's last path segment, for output names
    value: str  # what goes into the job's input.image
    bytes: int | None  # file size (None for URLs)
    origin: str  # the path or URL as given


def collect(items: Sequence[str]) -> list[Source]:
    """Files, folders (their pictures, sorted) and http(s) URLs, in the order given."""
    sources: list[Source] = []
    for item in items:
        if item.lower().startswith(("http://", "https://")):
            stem = Path(unquote(urlsplit(item).path)).stem or "url"
            sources.append(Source(stem, item, None, item))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
            if not files:
                raise EndpointError(f"{path} holds no pictures ({', '.join(sorted(PICTURE_SUFFIXES))})")
        elif path.is_file():
            files = [path]
        else:
            raise EndpointError(f"{item}: no such file or folder, and not an http(s) URL")
        for file in files:
            data = file.read_bytes()
            sources.append(Source(file.stem, base64.b64encode(data).decode("ascii"), len(data), str(file)))
    return sources


def job_input(source: Source, args: Any) -> dict[str, Any]:
    fields = {"prompt": args.prompt, "image": source.value, "seed": args.seed, "num_inference_steps": args.steps,
              "megapixels": args.megapixels, "num_images": args.num_images, "output_format": args.format}
    return {k: v for k, v in fields.items() if v is not None}


class BatchEditor:
    """Runs the jobs, saves the pictures, appends the log; thread-safe around files."""

    def __init__(self, client: EndpointClient, out_dir: Path, log_path: Path, sync: bool) -> None:
        self.client, self.out_dir, self.log_path, self.sync = client, out_dir, log_path, sync
        self._lock = threading.Lock()
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)

    def run_all(self, sources: list[Source], args: Any, concurrency: int,
                on_done: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Run every job; `on_done(record)` is called as each one finishes (print with tqdm.write
        so the progress bar stays whole)."""
        records: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max(1, concurrency)) as pool, tqdm(total=len(sources), unit="edit",
                                                                      disable=len(sources) < 2) as bar:
            futures = {pool.submit(self.run_one, source, args): source for source in sources}
            for future in as_completed(futures):
                record = future.result()
                records.append(record)
                if on_done is not None:
                    on_done(record)
                bar.update(1)
        return records

    def run_one(self, source: Source, args: Any) -> dict[str, Any]:
        job = {"input": job_input(source, args)}
        size = len(json.dumps(job))
        route = "runsync" if self.sync else "run"
        submitted = _now()
        record: dict[str, Any] = {"inputs": [{"name": source.origin, "bytes": source.bytes}],
                                  "settings": {k: v for k, v in job["input"].items() if k != "image"},
                                  "submitted_at": submitted, "endpoint": self.client.base_url}
        if size > MAX_REQUEST_BYTES[route]:
            limit_mb = MAX_REQUEST_BYTES[route] / 1e6
            record.update(status="FAILED", error=f"request is {size / 1e6:.1f} MB, over RunPod's {limit_mb:.0f} MB "
                          f"limit for /{route}: send a smaller picture or a URL")
            return self._log(record)
        try:
            body = self.client.run_sync(job) if self.sync else self.client.wait(self.client.submit(job))
        except EndpointError as err:
            record.update(status="ERROR", error=str(err))
            return self._log(record)
        output = body.get("output") or {}
        record.update(job_id=body.get("id"), status=body.get("status"), finished_at=_now(),
                      delayTime=body.get("delayTime"), executionTime=body.get("executionTime"),
                      timing=output.get("timing"), cost=output.get("cost"), model=output.get("model"))
        if body.get("status") != "COMPLETED":
            record["error"] = str(body.get("error") or f"job ended {body.get('status')}")
            return self._log(record)
        record["outputs"] = [self._save(source, item) for item in output.get("images", [])]
        return self._log(record)

    def _save(self, source: Source, item: dict[str, Any]) -> str:
        data = (requests.get(item["image"], timeout=60).content if item.get("type") == "url"
                else base64.b64decode(item["image"]))
        ext = "jpg" if item.get("format") == "jpeg" else item.get("format", "png")
        with self._lock:
            path = self.out_dir / f"{source.name}-seed{item.get('seed')}.{ext}"
            counter = 1
            while path.exists():
                path = self.out_dir / f"{source.name}-seed{item.get('seed')}-{counter}.{ext}"
                counter += 1
            path.write_bytes(data)
        return str(path)

    def _log(self, record: dict[str, Any]) -> dict[str, Any]:
        with self._lock, self.log_path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        return record


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
