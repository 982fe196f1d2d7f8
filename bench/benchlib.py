"""Shared pieces of the bench/ scripts: timing, tables, JSON, and the FLOP model of a step.

Why this exists: every benchmark reports the same way (a table on stdout, `--json` for machines,
the date and machine in the header) and derives achieved TFLOP/s from one formula
(facts.md section 6), so the scripts stay short and their numbers comparable.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

# Qwen-Image transformer: 20.43 B parameters, 60 blocks, width 3072 (24 heads x 128).
TRANSFORMER_PARAMS_PER_TOKEN_FLOPS = 2 * 6.80e9  # the linear layers, per token (facts.md section 6)
WIDTH, LAYERS = 3072, 60
TEXT_ENCODER_PARAMS = 8.29e9
PIXELS_PER_TOKEN = 16 * 16  # VAE factor 8, then 2x2 patches
VL_PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14 px patches, 2x2 merge
PROMPT_TOKENS = 70  # a typical edit instruction plus the chat template
PEAK_TFLOPS = {  # dense datasheet peaks: (bf16, fp8)
    "NVIDIA H100 80GB HBM3": (989.0, 1979.0), "NVIDIA H200": (989.0, 1979.0), "NVIDIA A100-SXM4-80GB": (312.0, None),
    "NVIDIA L40S": (362.0, 733.0), "NVIDIA RTX A6000": (155.0, None),
}


def tokens(variant: str, megapixels: float, images: int = 1) -> dict[str, int]:
    """Sequence lengths of one transformer pass (1 MP = 1024*1024 px, as the worker defines it)."""
    area = megapixels * 1024 * 1024
    image = int(area / PIXELS_PER_TOKEN)
    if variant == "edit":
        text = PROMPT_TOKENS + int(area / VL_PIXELS_PER_TOKEN)  # the VL encoder sees the working picture
    else:
        text = PROMPT_TOKENS + images * int(384 * 384 / VL_PIXELS_PER_TOKEN)  # 384x384 condition pictures
    return {"output": image, "condition": image * images, "text": text}


def pass_flops(variant: str, megapixels: float, images: int = 1) -> float:
    """FLOPs of one transformer pass: 2 * 6.80e9 * N + 4 * N^2 * 3072 * 60."""
    n = sum(tokens(variant, megapixels, images).values())
    return TRANSFORMER_PARAMS_PER_TOKEN_FLOPS * n + 4 * n * n * WIDTH * LAYERS


def median_ms(fn: Callable[[], Any], repeat: int = 20, warmup: int = 3, sync: Callable[[], None] | None = None
              ) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"date": dt.date.today().isoformat(), "python": platform.python_version(),
                            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def report(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool,
           extra: dict[str, Any] | None = None) -> None:
    """Print the table (or JSON with --json), headed by the date and machine."""
    info = machine()
    if as_json:
        print(json.dumps({"title": title, "machine": info, "rows": list(rows), **(extra or {})}, indent=2))
        return
    print(f"# {title}\n# {info}")
    print(table(rows, columns))
    for key, value in (extra or {}).items():
        print(f"# {key}: {value}")
