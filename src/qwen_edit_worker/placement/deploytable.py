"""What `qwen-edit deploy` must know of the worker, as a JSON file inside the client package.

Why this exists: the client is a light install (no torch, no worker package), yet it must refuse
a preset that cannot fit the GPU class before it sends anything, and it must know the Hub's
presets per class, the CUDA versions the image allows, the worker's setting names and the
variants' repos.  This module writes all of that once, from the sources of truth, to
client/qwen_edit_client/deploy_table.json; tests/test_deploy_table.py regenerates it and checks the
file, and checks the client's reading of it against this planner over every combination.

- `hub`: hub.json's CUDA versions and disk; per class (24, 48, 80, 141 GB) its pools (from the
  preset's name, "24 GB (AMPERE_24, ADA_24): ...") and the preset's settings.
- `pools`: the smallest card each serverless pool may give a worker (the total it reports, MiB,
  as nvidia-smi prints it: tests/test_activations_grid.py) and whether every card in it runs fp8
  (Ada or Hopper; AMPERE_24 also holds the L4, an Ada card, but its A5000 and 3090 do not).
- `need_bytes`: the planner's own numbers, planner.need() exactly as planner.plan() calls it (the
  base job: 1 MP, one picture, one image), per variant, PRECISION, TEXT_ENCODER_PRECISION, safety
  checker loaded or not, VAE tiled or not, and placement (MODES order).  The decision is then one
  comparison per placement (`plan`: the fastest whose need fits the card; an explicit OFFLOAD: that
  one), which the client makes and the test pins to planner.plan() itself.

`python -m qwen_edit_worker.placement.deploytable client/qwen_edit_client/deploy_table.json`
writes it (under a second, no torch).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..safety.policy import MODES as SAFETY_MODES
from ..settings import LB_SETTINGS, MEMORY_SAVING_MODES, OFFLOAD_MODES, SETTINGS
from ..weights.precision import PRECISION_SETTINGS, PRECISIONS
from ..weights.variants import DEFAULT_VARIANT, VARIANTS
from . import activations, planner
from .activations import JobShape

COMMAND = "python -m qwen_edit_worker.placement.deploytable client/qwen_edit_client/deploy_table.json"
HUB_JSON = Path(__file__).resolve().parents[3] / "hub.json"
MIB = 2**20
# pool -> (the smallest card it may give a worker, the total that card reports in MiB, every card runs fp8).
# Pools and cards: RunPod's docs (references/gpu-types.mdx, "GPU pools"); totals as nvidia-smi reports them.
POOL_CARDS: dict[str, tuple[str, int, bool]] = {
    "AMPERE_24": ("NVIDIA L4", 23_034, False),  # also A5000 and 3090 (24,564 MiB, Ampere: no fp8)
    "ADA_24": ("NVIDIA GeForce RTX 4090", 24_564, True),
    "AMPERE_48": ("NVIDIA A40", 46_068, False),  # also the A6000 (49,140 MiB)
    "ADA_48_PRO": ("NVIDIA L40S", 46_068, True),  # also the L40 (46,068) and RTX 6000 Ada (49,140)
    "AMPERE_80": ("NVIDIA A100 80GB PCIe", 81_920, False),
    "ADA_80_PRO": ("NVIDIA H100 80GB HBM3", 81_559, True),  # Hopper, in a pool named ADA
    "HOPPER_141": ("NVIDIA H200", 143_771, True),
}
FIT_SETTINGS = {"PRECISION": PRECISION_SETTINGS, "TEXT_ENCODER_PRECISION": PRECISIONS, "OFFLOAD": OFFLOAD_MODES,
                "MEMORY_SAVING": MEMORY_SAVING_MODES, "SAFETY_CHECKER": SAFETY_MODES}


def hub_classes(hub: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Class ("24") -> its pools (named in the preset's name) and the preset's settings, as strings."""
    classes = {}
    for preset in hub["config"]["presets"]:
        found = re.match(r"(\d+) GB \(([A-Z0-9_, ]+)\)", preset["name"])
        if found is None:
            raise ValueError(f"hub.json preset {preset['name']!r} does not start 'NN GB (POOL, ...)'")
        pools = [pool.strip() for pool in found.group(2).split(",")]
        unknown = [pool for pool in pools if pool not in POOL_CARDS or pool not in hub["config"]["gpuIds"]]
        if unknown:
            raise ValueError(f"hub.json preset {preset['name']!r}: pools {unknown} not in gpuIds or POOL_CARDS")
        env = {key: str(value).lower() if isinstance(value, bool) else str(value)
               for key, value in preset["defaults"].items()}
        classes[found.group(1)] = {"pools": pools, "preset": preset["name"], "env": env}
    return classes


def need_table() -> dict[str, dict[str, dict[str, list[int]]]]:
    """variant -> "PRECISION/TEXT_ENCODER_PRECISION/checker|no checker" -> "tiled"|"untiled" -> need per MODES."""
    out: dict[str, dict[str, dict[str, list[int]]]] = {}
    for name, variant in VARIANTS.items():
        edit_plus = variant.pipeline_class != "QwenImageEditPipeline"
        base = JobShape.one_image(1.0, edit_plus=edit_plus)
        rows = out.setdefault(name, {})
        for precision in PRECISION_SETTINGS:
            sized = "int8" if precision == "auto" else precision  # as the command sizes it: fp8 and int8 alike
            for text in PRECISIONS:
                for checker in (True, False):
                    sizes = planner.reference_sizes(sized, text, checker)
                    row = rows.setdefault(f"{precision}/{text}/{'checker' if checker else 'no checker'}", {})
                    for tiled in (True, False):
                        row["tiled" if tiled else "untiled"] = [
                            planner.need(mode, sizes, base, activations.precision_of(precision), tiled,
                                         planner.DEFAULT_STEPS, text, variant.zero_cond_t)[0]
                            for mode in planner.MODES]
    return out


def table(hub: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": f"written by `{COMMAND}` from hub.json, the worker's settings and its placement planner",
        "hub": {"allowedCudaVersions": hub["config"]["allowedCudaVersions"],
                "containerDiskInGb": hub["config"]["containerDiskInGb"], "classes": hub_classes(hub)},
        "pools": {pool: {"card": card, "bytes": mib * MIB, "fp8": fp8}
                  for pool, (card, mib, fp8) in POOL_CARDS.items()},
        "variants": {name: variant.repo for name, variant in VARIANTS.items()},
        "default_variant": DEFAULT_VARIANT,
        "settings": {name: default for name, (default, _) in SETTINGS.items()},
        "lb_settings": list(LB_SETTINGS),
        "choices": {name: list(values) for name, values in FIT_SETTINGS.items()},
        "modes": list(planner.MODES),
        "large_gpu_bytes": planner.LARGE_GPU_BYTES,
        "need_bytes": need_table(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_edit_worker.placement.deploytable",
                                     description="Write the table `qwen-edit deploy` reads (JSON).")
    parser.add_argument("path", type=Path, help="where to write it: client/qwen_edit_client/deploy_table.json")
    parser.add_argument("--hub", type=Path, default=HUB_JSON, help="hub.json (default: the repository's)")
    args = parser.parse_args(argv)
    written = table(json.loads(args.hub.read_text()))
    args.path.write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
