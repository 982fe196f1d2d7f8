"""`qwen-edit deploy`: create (or bring up to date) the endpoint the plan chose, then check it with one job.

Why this exists: a person otherwise copies `qwen-edit plan`'s answer and hub.json's preset into
RunPod's console by hand, and a slip (a 24 GB pool with the bf16 preset and no offload) only
shows as an out-of-memory at the first job.  The steps, in order:
1. the settings (endpoint_settings.desire), refused before any request if the worker could not run them;
2. RunPod's GPU catalog for GPU_PRICES (when it cannot be read: said, and the worker's table is left);
3. the endpoints, to find one of that name: none, create (`POST`); one, update (`PATCH` only what
   differs; nothing when nothing does, so a second run changes nothing); two or more, refuse;
4. the first job (smoke.py) after a create or an update, unless --no-smoke.
`--dry-run` stops after step 3's reads and prints the bodies it would send.  Everything printed
goes through RunPod API's scrub (the key never appears) and hides secret settings' values; with
--json the last line is one JSON object: `requests` (method, path, body, in order), and when known
`endpoint` (RunPod's answer) and `smoke` (the job's record).  Exit 0 done, 1 the first job failed
or no configuration meets --p95, 2 a refusal, a usage or an API error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import deploy_table, smoke
from .endpoint import EndpointError
from .endpoint_settings import SECRETS, Desired, Wanted, add_prices, changes, desire
from .plan import NoConfiguration
from .runpod_api import DEFAULT_URL, RunPodApi, RunPodApiError


def api_key(key_file: Path | None) -> str | None:
    """--api-key-file's first word, else RUNPOD_API_KEY; never printed."""
    if key_file is None:
        return os.environ.get("RUNPOD_API_KEY", "").strip() or None
    try:
        lines = key_file.read_text().split()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--api-key-file {key_file}: cannot read it ({type(err).__name__})") from None
    if not lines:
        raise ValueError(f"--api-key-file {key_file}: the file is empty")
    return lines[0]


def hidden(value: Any) -> Any:
    """A copy of a body, an endpoint or a recorded call ({method, path, body}) with secret settings' values
    replaced."""
    out = copy.deepcopy(value)
    holder = out.get("body") if isinstance(out, dict) and "method" in out else out
    env = holder.get("env") if isinstance(holder, dict) else None
    for name in SECRETS:
        if isinstance(env, dict) and name in env:
            env[name] = "<hidden>"
    return out


class Run:
    """One `qwen-edit deploy`: what it printed and sent, and the JSON it ends with."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key_error: ValueError | None = None
        try:
            self.key = api_key(args.api_key_file)
        except ValueError as error:
            self.key, self.key_error = None, error
        self.api = RunPodApi(os.environ.get("RUNPOD_API_URL", "").strip() or DEFAULT_URL, self.key)
        self.result: dict[str, Any] = {}
        self.body: dict[str, Any] = {}

    def say(self, text: str, err: bool = False) -> None:
        print(self.api.scrub(text), file=sys.stderr if err else sys.stdout, flush=True)

    def main(self) -> int:
        try:
            code = self.deploy()
        except NoConfiguration as error:
            code, self.result["error"] = 1, str(error)
        except (EndpointError, ValueError, OSError) as error:
            code, self.result["error"] = 2, str(error)
        if "error" in self.result:
            self.say(f"qwen-edit: {self.result['error']}", err=True)
        if self.args.json:
            self.result["requests"] = [hidden(call) for call in self.api.calls]
            self.say(json.dumps(self.result, sort_keys=True))
        return code

    def deploy(self) -> int:
        a = self.args
        if self.key_error is not None:
            raise self.key_error
        desired = desire(Wanted(a.image, a.gpu_class, a.name, a.variant, a.bake, a.lb, a.env or (), a.max_workers,
                                a.idle_timeout, a.flashboot, a.p95, a.rate, a.logs))
        self.body = desired.body
        existing = self.read(desired)
        self.result["settings"] = {key: {"value": desired.value(key), "from": source}
                                   for key, source in desired.sources.items()}
        self.show(desired)
        body = desired.body
        if existing is None:
            action, method, path, sent = "create", "POST", "/v2/serverless", body
        else:
            patch, notes = changes(body, existing)
            for note in notes:
                self.say(f"note: {note}")
            action = "update" if patch else "unchanged"
            method, path, sent = "PATCH", f"/v2/serverless/{existing['id']}", patch
        self.result["outcome"] = ("dry run: " if a.dry_run else "") + action
        if action == "unchanged":
            self.say(f"endpoint {existing['id']} ({body['name']}) already has every setting above: nothing sent, "
                     "and no smoke job (`qwen-edit edit` sends one)")
            self.result["endpoint"] = hidden(existing)
            return self.finish(existing, smoked=False)
        if a.dry_run:
            self.api.note(method, path, sent)
            self.say(f"dry run: would {action} with {method} {path}, sending nothing:")
            self.say(json.dumps(hidden(sent), indent=2))
            self.slim(None, body)
            return 0
        self.say(f"{action}: {method} {path}" + (f" ({', '.join(sent)})" if action == "update" else ""))
        endpoint = self.api.create(sent) if action == "create" else self.api.update(existing["id"], sent)
        self.result["endpoint"] = hidden(endpoint)
        self.say(f"endpoint {endpoint.get('id')} ({endpoint.get('name')}) {action}d")
        return self.finish(endpoint, smoked=not a.no_smoke)

    def read(self, desired: Desired) -> dict[str, Any] | None:
        """GPU_PRICES from the catalog, and the endpoint of that name (None: none yet)."""
        if self.key is None:
            if not self.args.dry_run:
                raise ValueError("no API key: set RUNPOD_API_KEY or pass --api-key-file FILE (a key from RunPod's "
                                 "console, Settings, API Keys, with read/write on Serverless)")
            add_prices(desired, None, "no API key, so the catalog was not read")
            desired.notes.append("no API key: your endpoints were not listed; shown as a create")
            return None
        try:
            add_prices(desired, self.api.gpu_types(), None)
        except RunPodApiError as error:
            if error.status in (401, 403):
                raise
            add_prices(desired, None, f"the catalog could not be read: {error}")
        name = desired.body["name"]
        named = [e for e in self.api.endpoints() if e.get("name") == name]
        if len(named) > 1:
            ids = ", ".join(str(e.get("id")) for e in named)
            raise ValueError(f"{len(named)} endpoints are named {name!r} (ids {ids}): deploy cannot tell which to "
                             "update; pass another --name, or delete all but one in the console; nothing was changed")
        return named[0] if named else None

    def show(self, desired: Desired) -> None:
        body = desired.body
        self.say(f"endpoint {body['name']!r}: {body['type']}, {self.args.gpu_class} GB class, image {body['image']}")
        for key, value, source in desired.shown():
            self.say(f"  {key} = {value}    [{source}]")
        for fit in desired.fits:
            self.say(f"fits: {fit.line()}")
        for note in desired.notes:
            self.say(note if note.startswith("plan:") else f"note: {note}")
        self.result["notes"] = list(desired.notes)

    def slim(self, endpoint_id: str | None, body: dict[str, Any]) -> None:
        repo = deploy_table.variants()[body["env"]["MODEL_VARIANT"]]
        where = f"endpoint {endpoint_id}" if endpoint_id else "the endpoint"
        self.say(f"slim image (built with BAKE_MODEL=0)? One console step the API cannot take: Serverless, {where}, "
                 f"Manage, Edit Endpoint, Model = {repo} (RunPod's cached model). An image with the model baked in "
                 "(the default build, the Hub's) needs nothing more.")

    def finish(self, endpoint: dict[str, Any], smoked: bool) -> int:
        for name, url in (endpoint.get("requestUrls") or {}).items():
            self.say(f"  {name:<10} {url}")
        self.slim(endpoint.get("id"), self.body)
        if not smoked:
            if self.args.no_smoke:
                self.say("no smoke job (--no-smoke)")
            return 0
        head = f"smoke job on {endpoint.get('id')}"
        bar = tqdm(total=None, desc=f"{head}: sent", bar_format="{desc} [{elapsed}]", file=sys.stderr)

        def progress(body: dict[str, Any]) -> None:
            bar.set_description_str(f"{head}: {body.get('status')}")

        try:
            record = smoke.run(endpoint, self.key, progress)
        finally:
            bar.close()
        self.result["smoke"] = record
        self.say(smoke.describe(record))
        if record.get("status") != "COMPLETED":
            self.say(f"the endpoint {endpoint.get('id')} exists with the settings above; fix what the job says and "
                     "run the same command again (it updates that endpoint)", err=True)
            return 1
        return 0
