"""What a job cost: the GPU's price per second times the job's execution seconds.

Why this exists: the people running this worker track cost per image (their goal: well under
one cent).  The price comes from GPU_PRICE_PER_SECOND when set ("env"), else from GPU_PRICES,
the live catalog prices `qwen-edit deploy` writes for every GPU type the endpoint may land on
("gpu_prices": one endpoint spans pools of different prices, so one figure cannot be right for
all), else from RunPod's serverless price table keyed by the GPU's name ("table"), else it is
unknown (CPU included) and the cost fields are null rather than a made-up number.  GPU_PRICES is
keyed by the catalog's GPU type `id` (`GET /v2/catalog/gpus`: "NVIDIA GeForce RTX 4090", "NVIDIA
H100 80GB HBM3"), which is the name the GPU gives itself (torch.cuda.get_device_name); matched
whole, ignoring case and surrounding spaces.  Pure: no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# RunPod serverless flex prices, USD per second (facts.md section 8, November 2026).  Each name
# is matched as a whole word in torch.cuda.get_device_name() (so "A40" is not found in
# "RTX A4000"), in order, so more specific names come first.
PRICE_TABLE: tuple[tuple[str, float], ...] = (
    ("B200", 0.00240),
    ("H200", 0.00155),
    ("H100", 0.00116),
    ("RTX PRO 6000", 0.00111),
    ("A100", 0.00076),
    ("L40S?", 0.00053),  # L40 and L40S
    ("RTX 6000 ADA", 0.00053),
    ("A6000", 0.00034),
    ("A40", 0.00034),
    ("4090", 0.00031),
    ("L4", 0.00019),
    ("A5000", 0.00019),
    ("3090", 0.00019),
    ("A4500", 0.00016),
    ("A4000", 0.00016),
    ("RTX 4000", 0.00016),
    ("RTX 2000", 0.00016),
)


def table_price(gpu_name: str | None) -> float | None:
    """The table price for a CUDA device name like 'NVIDIA H100 80GB HBM3', or None."""
    if not gpu_name:
        return None
    upper = gpu_name.upper()
    for name, price in PRICE_TABLE:
        if re.search(rf"(?<![A-Z0-9]){name}(?![A-Z0-9])", upper):
            return price
    return None


def listed_price(gpu_name: str | None, prices: Mapping[str, float] | None) -> float | None:
    """This GPU's price in GPU_PRICES (catalog name -> USD per second), or None."""
    if not gpu_name or not prices:
        return None
    wanted = gpu_name.strip().upper()
    return next((price for name, price in prices.items() if name.strip().upper() == wanted), None)


def job_cost(seconds: float, images: int, gpu_name: str | None, env_price: float | None,
             prices: Mapping[str, float] | None = None) -> dict[str, object]:
    """The job output's `cost` block."""
    listed = listed_price(gpu_name, prices)
    if env_price is not None:
        price, source = env_price, "env"
    elif listed is not None:
        price, source = listed, "gpu_prices"
    else:
        price = table_price(gpu_name)
        source = "table" if price is not None else "unknown"
    usd = None if price is None else round(seconds * price, 7)
    return {
        "gpu": gpu_name,
        "usd_per_second": price,
        "price_source": source,
        "seconds": round(seconds, 4),
        "usd": usd,
        "usd_per_image": None if usd is None else round(usd / max(images, 1), 7),
    }
