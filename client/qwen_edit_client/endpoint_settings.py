"""What `qwen-edit deploy` asks RunPod for: every endpoint setting, where it came from, and the PATCH.

Why this exists: what an edit costs is as much the endpoint's settings as the worker's, and each
already has a source in this project: the GPU class's pools and preset (hub.json, through
deploy_table.py), the bake's precision and container disk, `qwen-edit plan`'s cheapest workers,
idle timeout and FlashBoot for the traffic, and RunPod's live prices (GPU_PRICES).  `desire`
assembles them into a create body (RunPod's `CreateEndpointRequest`) with one source per setting,
and refuses, before any request, settings the worker could not run: a preset whose placement does
not fit the pool's smallest card (the worker's own planner numbers), fp8 on an Ampere pool (left
out), a bake's precision contradicted.  `changes` compares that body with an existing endpoint and
keeps only what differs (RunPod's `UpdateEndpointRequest`: a PATCH changes only what it is sent).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import catalog, deploy_table, plan
from .report import read_logs

EVERY_5_MINUTES = 12.0  # jobs an hour when no traffic is given: one job, then nothing (this worker's use)
PLAN_JOBS, PLAN_SEED = 200, 0
QUEUE_DELAY_S = 4  # RunPod's default queue delay
TIMEOUT_MS = 300_000  # docs/deploy.md: a warm job takes seconds, a cold one also waits for loading
SECRETS = ("HF_TOKEN", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "API_KEY")  # never printed


@dataclass
class Wanted:
    """The command's options."""

    image: str
    gpu_class: str
    name: str | None = None
    variant: str | None = None
    bake: str = "bf16"
    lb: bool = False
    env: Sequence[str] = ()  # KEY=VALUE
    max_workers: int | None = None
    idle_timeout: int | None = None
    flashboot: bool | None = None
    p95: float | None = None
    rate: float | None = None
    logs: Sequence[Path] = ()


@dataclass
class Desired:
    body: dict[str, Any]  # RunPod's CreateEndpointRequest
    sources: dict[str, str]  # "gpu.pools", "env.PRECISION", ... -> where the value came from
    fits: list[deploy_table.Fit]
    notes: list[str] = field(default_factory=list)

    def value(self, key: str) -> Any:
        """A setting's value ("gpu.pools", "env.PRECISION"), a secret's hidden."""
        if key.startswith("env."):
            return "<hidden>" if key[4:] in SECRETS else self.body["env"][key[4:]]
        value: Any = self.body
        for part in key.split("."):
            value = value[part]
        return value

    def shown(self) -> list[tuple[str, str, str]]:
        """(setting, value as text, source) for every setting, secrets' values hidden."""
        rows = []
        for key, source in self.sources.items():
            value = self.value(key)
            text = ", ".join(map(str, value)) if isinstance(value, list) else \
                json.dumps(value) if isinstance(value, dict) else str(value)
            rows.append((key, text, source))
        return rows


def desire(wanted: Wanted) -> Desired:
    """The endpoint's create body and sources, GPU_PRICES aside (add_prices: it needs the catalog)."""
    cls = deploy_table.gpu_class(wanted.gpu_class)
    variant = wanted.variant or deploy_table.table()["default_variant"]
    if variant not in deploy_table.variants():
        raise ValueError(f"--variant: one of {', '.join(deploy_table.variants())} (got {variant!r})")
    env, sources, notes = _env(wanted, cls, variant)
    pools = list(cls["pools"])
    if deploy_table.FP8 in (env.get("PRECISION"), env.get("TEXT_ENCODER_PRECISION")):
        dropped = [pool for pool in pools if pool not in deploy_table.fp8_pools(pools)]
        pools = deploy_table.fp8_pools(pools)
        if dropped:
            notes.append(f"fp8 runs on Ada and Hopper GPUs only: pool(s) {', '.join(dropped)} left out")
    fits = [deploy_table.fit(pool, env, variant) for pool in pools]
    bad = [f.line() for f in fits if not f.fits]
    if bad:
        raise ValueError(f"--gpu-class {wanted.gpu_class}: the worker could not hold the model with these settings: "
                         f"{'; '.join(bad)}; refused before anything was sent (change PRECISION, OFFLOAD or the class)")
    name = wanted.name or f"qwen-image-{variant}-{wanted.gpu_class}gb" + ("-lb" if wanted.lb else "")
    top, idle, boot, planned = _plan(wanted, pools, deploy_table.value(env, "PRECISION"))
    notes.insert(0, planned)
    disk = deploy_table.disk_gb(wanted.bake)
    body: dict[str, Any] = {
        "name": name, "type": "LOAD_BALANCER" if wanted.lb else "QUEUE", "image": wanted.image,
        "gpu": {"pools": pools, "count": 1, "allowedCudaVersions": deploy_table.table()["hub"]["allowedCudaVersions"]},
        "disk": disk, "workers": {"min": 0, "max": top[0], "idleTimeout": idle[0]},
        "flashboot": "FLASHBOOT" if boot[0] else "OFF", "scaling": _scaling(wanted.lb, env), "timeout": TIMEOUT_MS,
        "env": env}
    image_gb = catalog.IMAGE_BYTES[wanted.bake] / 1e9 + deploy_table.REST_OF_IMAGE_GB
    sources = {
        "name": "--name" if wanted.name else "default: qwen-image-<variant>-<class>gb",
        "type": "--lb" if wanted.lb else "default (--lb for LOAD_BALANCER)", "image": "--image",
        "gpu.pools": f"--gpu-class {wanted.gpu_class}: hub.json preset {cls['preset'].split(':')[0]!r}",
        "gpu.count": "one GPU a worker", "gpu.allowedCudaVersions": "hub.json allowedCudaVersions",
        "disk": f"the {wanted.bake} bake's image (~{image_gb:.0f} GB, docs/deploy.md size budget) + "
                f"{deploy_table.ROOM_GB:.0f} GB to work, rounded up",
        "workers.min": "0: no always-on worker (it would bill around the clock; set one in the console)",
        "workers.max": top[1], "workers.idleTimeout": idle[1], "flashboot": boot[1],
        "scaling": "the worker's CONCURRENCY: a new worker when each holds that many requests" if wanted.lb
                   else "RunPod's default queue delay",
        "timeout": "docs/deploy.md: 300 s (a warm job takes seconds)", **sources}
    return Desired(body, sources, fits, notes)


def _env(wanted: Wanted, cls: dict[str, Any], variant: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    label = cls["preset"].split(":")[0]
    env = dict(cls["env"])
    sources = {f"env.{key}": f"hub.json preset {label!r}" for key in env}
    env["MODEL_VARIANT"] = variant
    sources["env.MODEL_VARIANT"] = "--variant" if wanted.variant else "default (the variant the Hub image bakes)"
    if wanted.bake != "bf16":
        for key in ("PRECISION", "TEXT_ENCODER_PRECISION"):
            env[key] = wanted.bake
            sources[f"env.{key}"] = f"--bake {wanted.bake} (an image baked {wanted.bake} loads only that)"
    if wanted.lb:
        env["ENDPOINT_TYPE"] = "lb"
        sources["env.ENDPOINT_TYPE"] = "--lb"
    notes = []
    known = set(deploy_table.settings())
    for item in wanted.env:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ValueError(f"--env: KEY=VALUE, like --env LOG_LEVEL=DEBUG (got {key or item!r})")
        if key not in known:
            notes.append(f"--env {key}: not a setting this worker reads (a typo?); sent as given")
        env[key] = text
        sources[f"env.{key}"] = "--env"
    if wanted.bake != "bf16":
        precision, text_precision = env.get("PRECISION", ""), env.get("TEXT_ENCODER_PRECISION", "")
        if precision.lower() not in (wanted.bake, "auto") or text_precision.lower() != wanted.bake:
            raise ValueError(f"--env PRECISION={precision} TEXT_ENCODER_PRECISION={text_precision}: an image baked "
                             f"{wanted.bake} loads PRECISION {wanted.bake} (or auto) and TEXT_ENCODER_PRECISION "
                             f"{wanted.bake} only; refused before anything was sent")
    return env, sources, notes


def _scaling(lb: bool, env: dict[str, str]) -> dict[str, Any]:
    if not lb:
        return {"type": "QUEUE_DELAY", "queueDelay": QUEUE_DELAY_S}
    text = deploy_table.value(env, "CONCURRENCY")
    try:
        concurrency = int(text)
    except ValueError:
        raise ValueError(f"CONCURRENCY={text}: the worker takes a whole number from 1 to 4") from None
    return {"type": "REQUEST_COUNT", "requestCount": max(1, concurrency)}


Pick = tuple[Any, str]  # (value, where it came from)


def _plan(wanted: Wanted, pools: list[str], precision: str) -> tuple[Pick, Pick, Pick, str]:
    """Max workers, idle timeout and FlashBoot from `qwen-edit plan`'s cheapest configuration for the traffic."""
    if wanted.rate is not None and wanted.logs:
        raise ValueError("traffic: give LOG files or --rate N/h, not both")
    records = read_logs(list(wanted.logs)) if wanted.logs else None
    rate = wanted.rate if wanted.rate is not None or records is not None else EVERY_5_MINUTES
    arrivals, said = plan.arrivals(records, len(wanted.logs), rate, PLAN_JOBS, PLAN_SEED)
    if records is None and wanted.rate is None:
        said = f"no traffic given: one job every 5 minutes ({said})"
    inside = [g for g in catalog.GPU_CLASSES.values() if catalog.POOLS.get(g.name) in pools and g.job_s is not None]
    same = {"auto": ("int8", "fp8")}.get(precision, (precision,))
    gpus = [g.name for g in inside if g.settings.split(",")[0] in same] or [g.name for g in inside]
    grid = plan.Grid(gpus, [wanted.max_workers] if wanted.max_workers else plan.DEFAULT_GRID["max_workers"], [0],
                     [float(wanted.idle_timeout)] if wanted.idle_timeout else plan.DEFAULT_GRID["idle_timeout_s"],
                     [wanted.flashboot] if wanted.flashboot is not None else [True, False],
                     cold_start_s=catalog.cold_start_s(wanted.bake))
    results = plan.run_plan(arrivals, plan.Execution.parse(None, records is not None), grid)
    chosen = plan.recommend(results, wanted.p95)
    if chosen is None:
        fastest = min(results, key=lambda r: r["latency_s"]["p95"])
        raise plan.NoConfiguration(f"--p95 {wanted.p95:g}: no configuration meets it for {said}; the fastest has p95 "
                                   f"{fastest['latency_s']['p95']:.1f} s (qwen-edit plan shows them all); nothing "
                                   "was sent")
    config = chosen["config"]
    target = "" if wanted.p95 is None else f" with p95 <= {wanted.p95:g} s"
    source = f"qwen-edit plan: the cheapest{target} (plan: below)"
    line = (f"plan: {said}; the cheapest{target}: {config['gpu']}, max workers {config['max_workers']}, idle timeout "
            f"{config['idle_timeout_s']:g} s, FlashBoot {'on' if config['flashboot'] else 'off'}: "
            f"${chosen['usd_per_image']:.5f} per image all in, p95 {chosen['latency_s']['p95']:.1f} s")
    return ((config["max_workers"], "--max-workers" if wanted.max_workers else source),
            (int(round(config["idle_timeout_s"])), "--idle-timeout" if wanted.idle_timeout else source),
            (config["flashboot"], "--flashboot" if wanted.flashboot is not None else source), line)


def add_prices(desired: Desired, gpu_types: list[dict[str, Any]] | None, why_not: str | None) -> None:
    """GPU_PRICES from the catalog: every GPU type in the endpoint's pools -> USD per second (catalog USD/h / 3600)."""
    pools = desired.body["gpu"]["pools"]
    prices = {g["id"]: round(g["price"]["serverless"] / 3600, 8) for g in gpu_types or []
              if g.get("pool") in pools and (g.get("price") or {}).get("serverless")}
    if "GPU_PRICES" in desired.body["env"]:
        return  # --env GPU_PRICES wins
    if not prices:
        why = why_not or f"the catalog lists no serverless price in {', '.join(pools)}"
        desired.notes.append(f"GPU_PRICES not set ({why}): the worker prices its GPU from its built-in table")
        return
    desired.body["env"]["GPU_PRICES"] = json.dumps(prices, sort_keys=True, separators=(",", ":"))
    desired.sources["env.GPU_PRICES"] = f"RunPod's catalog (GET /v2/catalog/gpus): {len(prices)} GPU types, " \
                                        "price.serverless / 3600"


def changes(want: dict[str, Any], have: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The PATCH body that turns endpoint `have` into `want` (empty: nothing to change), and notes to print."""
    if have.get("type") and have["type"] != want["type"]:
        raise ValueError(f"endpoint {have.get('id')} named {want['name']!r} is a {have['type']} endpoint and RunPod "
                         f"cannot change that to {want['type']}: pass another --name, or delete it in the console")
    patch: dict[str, Any] = {key: want[key] for key in ("image", "disk", "timeout", "flashboot", "scaling")
                             if have.get(key) != want[key]}
    notes = []
    old_env = dict(have.get("env") or {})
    kept = sorted(set(old_env) - set(want["env"]))
    if {**old_env, **want["env"]} != old_env:
        patch["env"] = {**old_env, **want["env"]}  # RunPod replaces the whole env: keep what was set elsewhere
    if kept:
        notes.append(f"kept {len(kept)} setting(s) the endpoint has that deploy does not set: {', '.join(kept)}")
    old_gpu, gpu = have.get("gpu") or {}, {}
    if sorted(old_gpu.get("pools") or []) != sorted(want["gpu"]["pools"]):
        gpu["pools"] = want["gpu"]["pools"]
        if old_gpu.get("excludedTypes"):
            notes.append(f"new pools clear the excluded GPU types ({', '.join(old_gpu['excludedTypes'])})")
    if old_gpu.get("count") != want["gpu"]["count"]:
        gpu["count"] = want["gpu"]["count"]
    if sorted(old_gpu.get("allowedCudaVersions") or []) != sorted(want["gpu"]["allowedCudaVersions"]):
        gpu["allowedCudaVersions"] = want["gpu"]["allowedCudaVersions"]
    if old_gpu.get("minCudaVersion"):
        gpu["minCudaVersion"] = ""  # a floor beside an allowed set is refused (400): clear it
    if gpu:
        patch["gpu"] = gpu
    old_workers = have.get("workers") or {}
    if any(old_workers.get(key) != want["workers"][key] for key in want["workers"]):
        patch["workers"] = want["workers"]
    return patch, notes
