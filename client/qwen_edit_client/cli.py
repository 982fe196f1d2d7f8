"""`qwen-edit`: the command line (argument parsing, printing and exit codes; the work is elsewhere).

    qwen-edit edit photos/ --prompt "make the sky a sunset" [--seed N] [--steps N] [--megapixels X]
        [--num-images N] [--format png|jpeg|webp] [--output DIR] [--concurrency N] [--endpoint ID]
        [--base-url URL] [--sync] [--price USD_PER_S]
    qwen-edit cost edits/edits.jsonl [--idle-timeout S] [--price USD_PER_S] [--plot FILE.png] [--json]
    qwen-edit plan [LOG...] [--rate N/h | --burst N] [--grid] [--p95 S] [--plot FILE.png] [--json] ...
    qwen-edit deploy --image REF --gpu-class 24|48|80|141 [--name NAME] [--variant V] [--bake bf16|int8|fp8]
        [--rate N/h | LOG...] [--p95 S] [--max-workers N] [--idle-timeout S] [--flashboot on|off] [--lb]
        [--env KEY=VALUE ...] [--api-key-file F] [--no-smoke] [--dry-run] [--json]

The endpoint id comes from --endpoint or RUNPOD_ENDPOINT_ID, the key from RUNPOD_API_KEY (deploy:
or --api-key-file; never printed, never written); deploy talks to RUNPOD_API_URL (default
https://api.runpod.io).  Exit codes: 0 all done, 1 some jobs failed (edit), no configuration
meets --p95 (plan, deploy) or the first job failed (deploy), 2 a usage or endpoint error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from . import catalog, deploy, deploy_table, figures, plan, plots
from .edit import BatchEditor, collect
from .endpoint import EndpointClient, EndpointError, endpoint_base
from .report import cost_report, edit_summary, format_edit_summary, format_report, read_logs

T = TypeVar("T")


def listed(kind: Callable[[str], T], option: str) -> Callable[[str], list[T]]:
    """A comma list for a grid option, e.g. --idle-timeout 1,5,30."""
    def parse(text: str) -> list[T]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            problem = f"{option}: must be a comma list of {kind.__name__} (got {text!r})"
            raise argparse.ArgumentTypeError(problem) from None
    return parse


def checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Let argparse print the parser's own message (which names the option and what is allowed)."""
    def run(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return run


def on_off(text: str) -> bool:
    if text.strip().lower() not in ("on", "off"):
        raise ValueError(text)
    return text.strip().lower() == "on"


on_off.__name__ = "on/off"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="qwen-edit", description="Edit pictures through a Qwen-Image-Edit "
                                  "RunPod endpoint, see what each image cost, and plan the cheapest endpoint.")
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
    edit.add_argument("--price", type=float, help="USD per second for the printed costs when the worker "
                      "reports no GPU price (a local or CPU worker)")
    cost = commands.add_parser("cost", help="cost per image from one or more edit logs")
    cost.add_argument("logs", nargs="+", type=Path, metavar="LOG")
    cost.add_argument("--idle-timeout", type=float, default=5.0, help="the endpoint's idle timeout, s (default 5)")
    cost.add_argument("--price", type=float, help="USD per second, when the logs carry no GPU price")
    cost.add_argument("--plot", type=Path, metavar="FILE.png", help="draw cost and latency per job over time")
    cost.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_plan(commands)
    add_deploy(commands)
    return top


def add_plan(commands: Any) -> None:
    p = commands.add_parser("plan", help="simulate endpoint settings; the cheapest meeting a p95 latency",
                            description="Simulates a RunPod endpoint job by job, billed per second as RunPod "
                            "bills. Grid options take comma lists (e.g. --idle-timeout 1,5,30).")
    p.add_argument("logs", nargs="*", type=Path, metavar="LOG", help="replay these edit logs' submit times")
    p.add_argument("--rate", type=checked(plan.parse_rate), metavar="N/h", help="Poisson arrivals, e.g. 120/h")
    p.add_argument("--jobs", type=int, default=200, help="jobs to simulate with --rate (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for --rate (default 0)")
    p.add_argument("--burst", type=int, metavar="N", help="N jobs at once")
    p.add_argument("--exec", dest="execution", metavar="logs|table|SECONDS",
                   help="execution per job: the logs' times (default with logs), the GPU class's figure "
                   "(default otherwise), or fixed seconds")
    p.add_argument("--gpu", type=listed(str, "--gpu"),
                   help=f"GPU classes (default h100): {', '.join(catalog.GPU_CLASSES)}")
    p.add_argument("--max-workers", type=listed(int, "--max-workers"), help="max workers (default 3)")
    p.add_argument("--active-workers", type=listed(int, "--active-workers"), help="active workers (default 0)")
    p.add_argument("--idle-timeout", type=listed(float, "--idle-timeout"), help="idle timeout, s (default 5)")
    p.add_argument("--flashboot", type=listed(on_off, "--flashboot"), help="on, off or on,off (default on)")
    p.add_argument("--bake", choices=catalog.BAKES, default="bf16",
                   help="how the image was baked (its bytes decide --cold-start's default): bf16 (the Hub's "
                   "build), or fused int8/fp8 (default bf16)")
    p.add_argument("--cold-start", type=float,
                   help="cold start without FlashBoot, s (default derived for --bake: "
                   + ", ".join(f"{b} {catalog.cold_start_s(b):g}" for b in catalog.BAKES) + ")")
    p.add_argument("--flashboot-cold-start", type=float, default=catalog.FLASHBOOT_COLD_START_S,
                   help=f"cold start with FlashBoot, s (default {catalog.FLASHBOOT_COLD_START_S:g})")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once per worker (default 1)")
    p.add_argument("--price", type=float, help="USD per second, replacing the GPU class's flex price")
    p.add_argument("--active-discount", type=float, metavar="FRACTION",
                   help="active workers' discount off the flex price (default: RunPod's published active "
                   f"price per class, {catalog.DEFAULT_ACTIVE_DISCOUNT:g} where none is published)")
    p.add_argument("--window", type=float, default=0.0, metavar="SECONDS",
                   help="the period the jobs stand for: active workers are billed at least this long "
                   "(default: the jobs' span, as if the traffic repeats)")
    p.add_argument("--grid", action="store_true", help="grid over GPU classes with a figure x idle timeouts "
                   "1,5,15,60 x max workers 1,2,3,5 x active workers 0,1 (options given replace their list)")
    p.add_argument("--p95", type=float, metavar="SECONDS", help="recommend the cheapest with p95 latency within this")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="cost per image against p95, one point per config")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def positive(kind: Callable[[str], T], low: T, high: T | None = None) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            number = kind(text)
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):  # type: ignore[operator]
            span = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} {span} (got {text!r})")
        return number
    return parse


def add_deploy(commands: Any) -> None:
    d = commands.add_parser("deploy", help="create or update the endpoint through RunPod's REST API, then run one job",
                            description="Creates the endpoint (or updates the one of that name, changing only what "
                            "differs) through RunPod's REST API v2 with the GPU class's pools and Hub preset, the "
                            "plan's cheapest workers, idle timeout and FlashBoot for the traffic, and RunPod's live "
                            "prices (GPU_PRICES); then sends test_input.json's edit as a first job. Key: "
                            "RUNPOD_API_KEY or --api-key-file; API: RUNPOD_API_URL (default https://api.runpod.io).")
    d.add_argument("logs", nargs="*", type=Path, metavar="LOG", help="plan for these edit logs' traffic")
    d.add_argument("--image", required=True, metavar="REF", help="the worker image, e.g. docker.io/you/qwen-edit:2511")
    d.add_argument("--gpu-class", required=True, choices=deploy_table.classes(), help="GPU memory class, GB")
    d.add_argument("--name", help="endpoint name (default qwen-image-<variant>-<class>gb[-lb]); an endpoint of that "
                   "name is updated")
    d.add_argument("--variant", choices=list(deploy_table.variants()), help="MODEL_VARIANT (default: the image's, "
                   f"{deploy_table.table()['default_variant']})")
    d.add_argument("--bake", choices=catalog.BAKES, default="bf16", help="how the image was baked: bf16 (default, the "
                   "Hub's), or fused int8/fp8 (sets both precisions, the container disk and the plan's cold start)")
    d.add_argument("--rate", type=checked(plan.parse_rate), metavar="N/h",
                   help="traffic for the plan (default: one job every 5 minutes)")
    d.add_argument("--p95", type=float, metavar="SECONDS", help="the plan's p95 latency target")
    d.add_argument("--max-workers", type=positive(int, 1), metavar="N", help="replaces the plan's max workers")
    d.add_argument("--idle-timeout", type=positive(int, 1, 3600), metavar="S",
                   help="replaces the plan's idle timeout (whole seconds, 1 to 3600)")
    d.add_argument("--flashboot", type=checked(on_off), metavar="on|off", help="replaces the plan's FlashBoot")
    d.add_argument("--lb", action="store_true", help="a load-balancing endpoint (ENDPOINT_TYPE=lb) instead of a queue")
    d.add_argument("--env", action="append", metavar="KEY=VALUE", help="a worker setting, over the preset's (repeat)")
    d.add_argument("--api-key-file", type=Path, metavar="F", help="read the API key from this file, not RUNPOD_API_KEY")
    d.add_argument("--no-smoke", action="store_true", help="no first job after a create or an update")
    d.add_argument("--dry-run", action="store_true", help="print the request bodies; send nothing that changes "
                   "anything (the catalog and your endpoints are read)")
    d.add_argument("--json", action="store_true", help="end with one JSON line: requests, endpoint, smoke")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run = {"edit": run_edit, "cost": run_cost, "plan": run_plan, "deploy": run_deploy}[args.command]
    try:
        return run(args)
    except (EndpointError, ValueError, OSError) as err:
        print(f"qwen-edit: {err}", file=sys.stderr)
        return 2


def run_deploy(args: argparse.Namespace) -> int:
    return deploy.Run(args).main()


def run_edit(args: argparse.Namespace) -> int:
    client = EndpointClient(endpoint_base(args.endpoint, args.base_url), os.environ.get("RUNPOD_API_KEY"))
    sources = collect(args.inputs)
    editor = BatchEditor(client, args.output, args.log or args.output / "edits.jsonl", args.sync)

    def finished(record: dict[str, Any]) -> None:
        name = record["inputs"][0]["name"]
        if record.get("status") != "COMPLETED":
            tqdm.write(f"{name}: {record.get('status')}: {record.get('error')}", file=sys.stderr)
            return
        usd, source = figures.usd_per_image(record, args.price)
        cost = "cost n/a: the worker reports no GPU price (pass --price)" if usd is None else \
            f"${usd:.5f} per image ({source})"
        tqdm.write(f"{name} -> {', '.join(record['outputs'])}  {cost}")

    records = editor.run_all(sources, args, args.concurrency, on_done=finished)
    print(format_edit_summary(edit_summary(records, args.price)))
    failed = [r for r in records if r.get("status") != "COMPLETED"]
    if failed and len(failed) == len(records) and all(r.get("status") == "ERROR" for r in failed):
        return 2
    return 1 if failed else 0


def run_cost(args: argparse.Namespace) -> int:
    records = read_logs(args.logs)
    report = cost_report(records, args.idle_timeout, args.price)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.plot:
        plots.plot_jobs(records, args.plot, report["usd_per_second"])
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    given = [name for name, value in (("LOG", args.logs), ("--rate", args.rate), ("--burst", args.burst)) if value]
    if len(given) != 1:
        raise ValueError(f"arrivals: give exactly one of LOG files, --rate N/h or --burst N (got {given or 'none'})")
    arrivals, said = plan.arrivals(read_logs(args.logs) if args.logs else None, len(args.logs), args.rate,
                                   args.jobs, args.seed, args.burst)
    execution = plan.Execution.parse(args.execution, bool(args.logs))

    def pick(value: list[T] | None, grid: list[T], single: list[T]) -> list[T]:
        return value if value else (grid if args.grid else single)

    gpus = pick(args.gpu, catalog.with_figures() if execution.mode == "table" else list(catalog.GPU_CLASSES), ["h100"])
    grid = plan.Grid(gpus, pick(args.max_workers, plan.DEFAULT_GRID["max_workers"], [3]),
                     pick(args.active_workers, plan.DEFAULT_GRID["active_workers"], [0]),
                     pick(args.idle_timeout, plan.DEFAULT_GRID["idle_timeout_s"], [5.0]),
                     args.flashboot or [True], args.concurrency,
                     args.cold_start if args.cold_start is not None else catalog.cold_start_s(args.bake),
                     args.flashboot_cold_start,
                     args.price, args.active_discount, args.window)
    results = plan.run_plan(arrivals, execution, grid)
    chosen = plan.recommend(results, args.p95)
    if args.json:
        print(json.dumps({"arrivals": said, "p95_target_s": args.p95, "recommended": chosen, "results": results},
                         indent=2))
    else:
        print(plan.format_plan(results, chosen, args.p95, said))
    if args.plot:
        plots.plot_plan(results, chosen, args.plot, args.p95)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0 if chosen is not None else 1
