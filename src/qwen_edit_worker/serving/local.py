"""Running one job on this machine: `python handler.py` or `python handler.py --test_input '<json>'`.

Why this exists: the RunPod SDK's own local runner logs the whole job result, base64 pictures
included, and writes no files.  This runner feeds the same handler the same job shape
(test_input.json or --test_input), writes each picture to a file, and prints the result with
each picture's data (and the `image_url` data URI) replaced by its file's path.  It exits 1 when
the job fails, as the SDK does.
It takes the handler as RunPod does, plain or async (handler.py's is async).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import RequestError

log = logging.getLogger(__name__)
Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run one edit job locally and write the pictures to files.")
    parser.add_argument("--test_input", help="the job as JSON, e.g. '{\"input\": {...}}' (default: test_input.json)")
    parser.add_argument("--output_dir", default="outputs", help="where the edited pictures go (default: outputs)")
    args, _unknown = parser.parse_known_args(list(argv))  # the SDK's --rp_* flags are not ours
    return args


def load_job(test_input: str | None, default_file: Path = Path("test_input.json")) -> dict[str, Any]:
    try:
        job = json.loads(test_input) if test_input else json.loads(default_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequestError("test_input", f"no --test_input given and {default_file} does not exist") from None
    except json.JSONDecodeError as err:
        raise RequestError("test_input", f"not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(job, dict) or not isinstance(job.get("input"), dict):
        raise RequestError("test_input", 'must be a JSON object with an "input" object: {"input": {...}}')
    job.setdefault("id", "local_test")
    return job


def run_local(handle: Handler, argv: Sequence[str]) -> int:
    """Run the job, write its pictures, print the result; return the process exit code."""
    args = parse_args(argv)
    try:
        job = load_job(args.test_input)
    except RequestError as err:
        log.error("%s", err)
        return 1
    result = handle(job)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    if "error" in result:
        log.error("job %s failed: %s", job["id"], result["error"])
        return 1
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(result.get("images", [])):
        path = out_dir / f"{job['id']}-{index}.{'jpg' if image['format'] == 'jpeg' else image['format']}"
        path.write_bytes(base64.b64decode(image.pop("image")))
        image["file"] = str(path)
        log.info("wrote %s (%dx%d)", path, image["width"], image["height"])
    if str(result.get("image_url", "")).startswith("data:"):  # the first picture again: its file instead
        result["image_url"] = result["images"][0]["file"]
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


async def _awaited(result: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    return await result
