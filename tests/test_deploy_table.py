"""What `qwen-edit deploy` carries from the worker's side (client/qwen_edit_client/deploy_table.json, the
smoke job's input, the container disk) is what the worker's side says; and the fake of RunPod's API holds
RunPod's schema strictly enough to fail a client that strays from it."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from qwen_edit_client import catalog, deploy_table, smoke
from qwen_edit_worker.placement import deploytable, planner
from qwen_edit_worker.weights.variants import VARIANTS
from runpod_rest import OPENAPI_SHA256, openapi_sha256, problems

ROOT = Path(__file__).resolve().parent.parent
HUB = json.loads((ROOT / "hub.json").read_text())
CREATE = "#/components/schemas/CreateEndpointRequest"


def test_the_table_is_what_the_worker_writes() -> None:
    """Regenerate with `python -m qwen_edit_worker.placement.deploytable client/qwen_edit_client/deploy_table.json`."""
    assert deploy_table.table() == json.loads(json.dumps(deploytable.table(HUB)))


def test_the_clients_fit_is_the_planners_decision_everywhere() -> None:
    """Every pool's smallest card x variant x PRECISION x TEXT_ENCODER_PRECISION x OFFLOAD x MEMORY_SAVING x safety
    checker: the client's verdict from the table's numbers equals planner.plan() itself, as the worker and
    `python -m qwen_edit_worker.placement` call it."""
    table = deploy_table.table()
    choices = table["choices"]
    checked = refused = 0
    for pool, (variant_name, variant) in itertools.product(table["pools"], VARIANTS.items()):
        gpu = table["pools"][pool]["bytes"]
        for precision, text, offload, saving, checker in itertools.product(
                choices["PRECISION"], choices["TEXT_ENCODER_PRECISION"], choices["OFFLOAD"], choices["MEMORY_SAVING"],
                ("off", "request")):
            env = {"PRECISION": precision, "TEXT_ENCODER_PRECISION": text, "OFFLOAD": offload, "MEMORY_SAVING": saving,
                   "SAFETY_CHECKER": checker}
            sized = "int8" if precision == "auto" else precision
            plan = planner.plan(planner.reference_sizes(sized, text, checker != "off"), gpu, offload,
                                precision=precision, vae_tiled=None if saving == "auto" else saving == "on",
                                edit_plus=variant.pipeline_class != "QwenImageEditPipeline",
                                text_encoder_precision=text, zero_cond_t=variant.zero_cond_t)
            fit = deploy_table.fit(pool, env, variant_name)
            assert (fit.fits, fit.offload, fit.need_bytes) == (plan.fits, plan.offload, plan.need_bytes), (pool, env)
            checked += 1
            refused += not fit.fits
    assert checked == 7 * 3 * 4 * 3 * 5 * 3 * 2 and 0 < refused < checked  # both answers occur


def test_the_pools_smallest_cards() -> None:
    """The 24 GB class's smallest card is the L4 (AMPERE_24, fp8 not assured: its A5000 and 3090 are Ampere)."""
    pools = deploy_table.table()["pools"]
    assert pools["AMPERE_24"] == {"card": "NVIDIA L4", "bytes": 23_034 * 2**20, "fp8": False}
    assert [p for p in pools if pools[p]["fp8"]] == ["ADA_24", "ADA_48_PRO", "ADA_80_PRO", "HOPPER_141"]
    for gb, spec in deploy_table.table()["hub"]["classes"].items():
        assert set(spec["pools"]) <= set(HUB["config"]["gpuIds"].split(","))
        assert all(pools[p]["bytes"] >= int(gb) * 0.96 * 1e9 for p in spec["pools"])  # a card of its class


def test_plan_classes_cover_every_pool_deploy_uses() -> None:
    assert set(catalog.POOLS) == set(catalog.GPU_CLASSES)
    for spec in deploy_table.table()["hub"]["classes"].values():
        assert any(catalog.POOLS[g.name] in spec["pools"] and g.job_s for g in catalog.GPU_CLASSES.values())


def test_container_disk_follows_the_size_budget() -> None:
    """deploy_table.disk_gb: hub.json's 80 GB for the Hub's bf16 build, and docs/deploy.md's size budget rows."""
    assert deploy_table.disk_gb("bf16") == HUB["config"]["containerDiskInGb"] == 80
    docs = (ROOT / "docs" / "deploy.md").read_text()
    rows = {"int8": "FUSE_LIGHTNING=1 PRECISION=int8 TEXT_ENCODER_PRECISION=int8",
            "fp8": "FUSE_LIGHTNING=1 PRECISION=fp8 TEXT_ENCODER_PRECISION=fp8"}
    for bake, args in rows.items():
        found = re.search(rf"^\| `{re.escape(args)}`.*\| (\d+) \|$", docs, re.M)
        assert found and int(found.group(1)) == deploy_table.disk_gb(bake), bake


def test_the_smoke_job_is_test_input_json() -> None:
    assert smoke.job() == json.loads((ROOT / "test_input.json").read_text())


class TestTheFakeHoldsRunPodsSchema:
    """tests/runpod_rest.py validates with RunPod's document as published; these show it refuses what RunPod would."""

    GOOD = {"name": "n", "type": "QUEUE", "image": "i", "gpu": {"pools": ["ADA_24"], "count": 1},
            "workers": {"min": 0, "max": 1, "idleTimeout": 5}, "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
            "flashboot": "FLASHBOOT", "env": {"A": "1"}, "disk": 20, "timeout": 300000}

    def test_the_document_is_runpods(self) -> None:
        assert openapi_sha256() == OPENAPI_SHA256

    def test_a_good_body_passes(self) -> None:
        assert problems(CREATE, self.GOOD) == []

    @pytest.mark.parametrize(("change", "said"), [
        ({"idle_timeout": 5}, "Unevaluated properties are not allowed ('idle_timeout' was unexpected)"),
        ({"flashboot": "ON"}, "'ON' is not one of ['OFF', 'FLASHBOOT', 'PRIORITY_FLASHBOOT']"),
        ({"type": "LOAD_BALANCER"}, "$.scaling"),  # if/then: a load balancer scales on REQUEST_COUNT only
        ({"workers": {"min": 0, "max": 1, "idleTimeout": 0}}, "0 is less than the minimum of 1"),
        ({"gpu": {"pools": []}}, "should be non-empty"),
        ({"gpu": {"pools": ["ADA_24"], "minCudaVersion": "12"}}, "does not match"),
        ({"env": {"A": 1}}, "1 is not of type 'string'"),
        ({"image": None}, "None is not of type 'string'"),
    ])
    def test_what_runpod_refuses_fails(self, change: dict[str, object], said: str) -> None:
        found = problems(CREATE, {**self.GOOD, **change})
        assert found and any(said in line for line in found), found

    def test_image_is_required_without_a_template(self) -> None:
        body = {k: v for k, v in self.GOOD.items() if k != "image"}
        assert any("'image' is a required property" in line for line in problems(CREATE, body))
        assert problems(CREATE, body | {"templateId": "t"}) == []
