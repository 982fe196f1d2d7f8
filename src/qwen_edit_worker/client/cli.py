"""`qwen-edit`: the command line (argument parsing and exit codes only; the work is in edit and report).

    qwen-edit edit photos/ --prompt "make the sky a sunset" [--seed N] [--steps N] [--megapixels X]
        [--num-images N] [--format png|jpeg|webp] [--output DIR] [--concurrency N] [--endpoint ID]
        [--base-url URL] [--sync]
    qwen-edit cost edits/edits.jsonl [--idle-timeout S] [--price USD_PER_S] [--plot FILE.png] [--json]

The endpoint id comes from --endpoint or RUNPOD_ENDPOINT_ID, the key from RUNPOD_API_KEY (never
printed, never written).  Exit codes: 0 all done, 1 some jobs failed, 2 a usage or endpoint error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .edit import BatchEditor, collect
from .endpoint import EndpointClient, EndpointError, endpoint_base
from .report import cost_report, format_report, plot, read_logs


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="qwen-edit", description="Edit pictures through a Qwen-Image-Edit "
                                  "RunPod endpoint, and see what each image cost.")
    commands = top.add_subparsers(dest="command", required=True)
    edit = commands.add_parser("edit", help="send each picture as one job and save the results")
    edit.add_argument("inputs", nargs="+", metavar="FILE_OR_URL", help="picture files, folders of pictures, URLs")
    edit.add_argument("--prompt", required=True, help="the edit instruction")
    edit.add_argument("--seed", type=int, help="seed (default: random per job; returned and logged)")
    edit.add_argument("--steps", type=int, help="denoising steps (worker default: 3)")
    edit.add_argument("--megapixels", type=float, help="working and output area (worker default: 1.0)")
    edit.add_argument("--num-images", type=int, help="pictures per input (1 to 4)")
    edit.add_argument("--format", choices=["png", "jpeg", "webp"], help="output format (worker default: png)")
    edit.add_argument("--output", type=Path, default=Path("edits"), help="where pictures go (default ./edits)")
    edit.add_argument("--log", type=Path, help="JSON Lines log (default: <output>/edits.jsonl)")
    edit.add_argument("--concurrency", type=int, default=4, help="jobs at once (default 4)")
    edit.add_argument("--endpoint", default=os.environ.get("RUNPOD_ENDPOINT_ID"), help="endpoint id")
    edit.add_argument("--base-url", help="replaces the whole endpoint base, e.g. http://127.0.0.1:8000")
    edit.add_argument("--sync", action="store_true", help="use /runsync instead of /run and /status")
    cost = commands.add_parser("cost", help="cost per image from one or more edit logs")
    cost.add_argument("logs", nargs="+", type=Path, metavar="LOG")
    cost.add_argument("--idle-timeout", type=float, default=5.0, help="the endpoint's idle timeout, s (default 5)")
    cost.add_argument("--price", type=float, help="USD per second, when the logs carry no GPU price")
    cost.add_argument("--plot", type=Path, metavar="FILE.png", help="draw cost and latency per job over time")
    cost.add_argument("--json", action="store_true", help="print the figures as JSON")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run_edit(args) if args.command == "edit" else run_cost(args)
    except (EndpointError, ValueError, OSError) as err:
        print(f"qwen-edit: {err}", file=sys.stderr)
        return 2


def run_edit(args: argparse.Namespace) -> int:
    client = EndpointClient(endpoint_base(args.endpoint, args.base_url), os.environ.get("RUNPOD_API_KEY"))
    sources = collect(args.inputs)
    editor = BatchEditor(client, args.output, args.log or args.output / "edits.jsonl", args.sync)
    records = editor.run_all(sources, args, args.concurrency)
    failed = [r for r in records if r.get("status") != "COMPLETED"]
    for record in records:
        name = record["inputs"][0]["name"]
        if record.get("status") == "COMPLETED":
            cost = (record.get("cost") or {}).get("usd_per_image")
            print(f"{name} -> {', '.join(record['outputs'])}" + (f"  (${cost:.5f} per image)" if cost else ""))
        else:
            print(f"{name}: {record.get('status')}: {record.get('error')}", file=sys.stderr)
    if failed and len(failed) == len(records) and all(r.get("status") == "ERROR" for r in failed):
        return 2
    return 1 if failed else 0


def run_cost(args: argparse.Namespace) -> int:
    records = read_logs(args.logs)
    report = cost_report(records, args.idle_timeout, args.price)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.plot:
        plot(records, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
