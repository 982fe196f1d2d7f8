"""The real graph's FLOPs per phase, as a small table the client and the docs read.

Why this exists: the time and cost tables (docs/benchmarks.md, docs/deploy.md, the client's
`qwen-edit plan` catalog) are derived from FLOPs.  Those FLOPs come from the real model's graph
(placement/measure.py on fake CUDA, torch's FlopCounterMode), not from a hand formula.  The client
must not import torch, so the harness writes them once to a JSON file inside the client package
(client/qwen_edit_client/real_graph_flops.json) and the client reads that; a test re-measures
entries with the harness and checks the file.

`python -m qwen_edit_worker.placement.flopstable PATH` writes it (about two minutes on two cores).
This module reads the harness (measure.py); the harness knows nothing of the table.  Each row is
one job: the variant, the output megapixels, one picture of the same size, one image, ~67 prompt
tokens, bf16 arithmetic (int8/fp8 do the same arithmetic).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..weights.variants import VARIANTS
from .measure import Job, measure

STEPS = 3  # the Lightning LoRA's steps: one transformer pass each (no classifier-free guidance)
MEGAPIXELS = (0.5, 1.0, 2.0)
COMMAND = "python -m qwen_edit_worker.placement.flopstable client/qwen_edit_client/real_graph_flops.json"
SOURCE = f"derived from the real graph ({COMMAND})"


def row(variant: str, megapixels: float) -> dict[str, Any]:
    """One job's TFLOP per phase (`denoise` is one pass) and for the whole 3-step job."""
    job = Job(variant, megapixels)
    phases = measure(job)
    tflop = {name: round(phase.flops / 1e12, 2) for name, phase in phases.items()}
    total = sum(phases[name].flops for name in ("text", "encode", "decode")) + STEPS * phases["denoise"].flops
    return {"variant": variant, "megapixels": megapixels, "tokens": job.shape().tokens(),
            "tflop": tflop, "job_tflop": round(total / 1e12, 2)}


def table() -> dict[str, Any]:
    """Every variant at every size in MEGAPIXELS."""
    job = Job()
    return {"source": SOURCE, "steps": STEPS,
            "job": {"pictures": job.pictures, "images": job.images, "prompt_tokens": job.prompt_tokens,
                    "precision": "bf16 arithmetic (int8 and fp8 do the same)"},
            "rows": [row(variant, mp) for variant in VARIANTS for mp in MEGAPIXELS]}


def write(path: Path) -> dict[str, Any]:
    data = table()
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_edit_worker.placement.flopstable",
                                     description="Write the real graph's FLOPs, every variant at 0.5, 1 and 2 MP.")
    parser.add_argument("path", type=Path, help="the JSON file (client/qwen_edit_client/real_graph_flops.json)")
    write(parser.parse_args(argv).path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
