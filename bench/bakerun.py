"""The measured process of bench/bake: one preparation (before or after) or one builder/bake.py run, then its account.

Why this exists: the figures must be the bake's alone, so it runs in a process of its own that bench/bake
watches from outside (bench/procwatch.py: anonymous memory and RSS of the tree), and that reports at its end
what only it can read about itself: the seconds of the work (imports excluded), its CPU time (user + system,
every thread), its storage I/O (/proc/self/io: read_bytes and write_bytes reach the disk; mapped pages count
when faulted in; cancelled_write_bytes were written then deleted before reaching it), and VmHWM.

    python bench/bakerun.py prepare --mode before|after --folder DIR --precision P --text-encoder-precision Q
        [--no-fuse] [--lora-ref REF]
    python bench/bakerun.py bake -- <builder/bake.py's arguments>

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes", "cancelled_write_bytes")


def io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in IO_KEYS:
            out[key] = int(value)
    return out


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vm_hwm_gb() -> float:
    text = Path("/proc/self/status").read_text()
    return round(int(text.split("VmHWM:")[1].split()[0]) * 1024 / 1e9, 2)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # noqa: F401 (imported before the clock starts, as bake.py imports it before preparing)

    if args.mode == "before":
        import prepare_before as module
    else:
        from qwen_edit_worker.weights import prepare as module
    folder = args.folder
    lora = next((folder / "lightning").glob("*.safetensors"), None) if not args.no_fuse else None
    started, cpu, before = time.perf_counter(), cpu_s(), io()
    block = module.prepare(folder, lora, args.lora_ref if lora else None, args.precision, args.text_encoder_precision)
    return {"seconds": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_s() - cpu, 1),
            "io": {k: io()[k] - before[k] for k in IO_KEYS}, "prepared": block}


def bake(argv: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(benchlib.ROOT / "builder"))
    import bake as baking

    started, cpu, before = time.perf_counter(), cpu_s(), io()
    code = baking.main(argv)
    return {"seconds": round(time.perf_counter() - started, 1), "cpu_s": round(cpu_s() - cpu, 1),
            "io": {k: io()[k] - before[k] for k in IO_KEYS}, "exit": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("prepare")
    one.add_argument("--mode", choices=("before", "after"), required=True)
    one.add_argument("--folder", type=Path, required=True)
    one.add_argument("--precision", required=True)
    one.add_argument("--text-encoder-precision", required=True)
    one.add_argument("--no-fuse", action="store_true")
    one.add_argument("--lora-ref", default="random-weights")
    sub.add_parser("bake").add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.what == "prepare":  # bake.py configures its own logging
        logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
        logging.getLogger("qwen_edit_worker").setLevel(logging.INFO)
    result = prepare(args) if args.what == "prepare" else bake([a for a in args.rest if a != "--"])
    result.update(total_cpu_s=round(cpu_s(), 1), vm_hwm_gb=vm_hwm_gb())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
