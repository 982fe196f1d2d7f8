"""The transformer read block by block from memory-mapped safetensors, fused and quantised on the way.

Why this exists: a bf16 bake (the Hub's default build) holds a 40.9 GB transformer.  Loading it
whole puts all 40.9 GB in host memory, and it does not fit a 24 GB GPU to be quantised there.
Here the model is built empty (accelerate's meta device), and each block in turn (a transformer
block, or a top-level layer) is read from the safetensors files through their memory map, moved
to `device`, has the Lightning LoRA fused into its linear layers (weights/lightning.py fuse_pairs:
W += B @ A, the same fuse the whole-model load makes), is quantised there
with the torchao configuration of weights/precision.py, and is left on `home` (the GPU when the
plan keeps the transformer resident).  Host memory holds one tensor at a time beyond the page
cache; the GPU one block of bf16 beyond what is already resident.  On a CPU the same path runs
with device and home "cpu" (tests compare its pixels with the whole-model load, fuse and
quantisation).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..weights import lightning, lightning_file, precision

log = logging.getLogger(__name__)
BLOCK = re.compile(r"^(transformer_blocks\.\d+)\.")


def block_of(name: str) -> str:
    """`transformer_blocks.7` for a name inside block 7; else the top-level layer (`img_in`, `norm_out`)."""
    found = BLOCK.match(name)
    return found.group(1) if found else name.split(".", 1)[0]


def load_transformer(folder: Path, transformer_class: Any, dtype: Any, device: str, home: str,
                     quantise_to: str | None, lora: lightning_file.LoraFile | None) -> tuple[Any, dict[str, Any]]:
    """The transformer in `folder`, block by block; (model, {"where", "blocks", "seconds", "lora_layers"}).

    The LoRA is checked against the empty model's layers before any weight is read (lightning_file.py: the
    check the whole-model fuse makes too), so a file that does not fit fails as LORA_PATH with nothing read.
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from torchao.quantization import quantize_

    started = time.perf_counter()
    with init_empty_weights():
        model = transformer_class.from_config(transformer_class.load_config(str(folder)))
    pairs = lora.pairs(lightning_file.linear_shapes(model)) if lora is not None else {}
    handles = [safe_open(str(file), framework="pt", device="cpu") for file in sorted(folder.glob("*.safetensors"))]
    stored = {name: handle for handle in handles for name in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    params = [name for name, _ in model.named_parameters()]
    missing = [name for name in params if name not in stored]
    if missing:
        raise ModelLoadError("MODEL_PATH", f"{folder} lacks {len(missing)} transformer weights (e.g. {missing[0]})")
    blocks: dict[str, list[str]] = {}
    for name in params:
        blocks.setdefault(block_of(name), []).append(name)
    linears = {fqn for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = precision.torchao_config(quantise_to) if quantise_to else None
    fused = 0
    for block, names in blocks.items():
        for name in names:
            value = stored[name].get_tensor(name).to(device=device, dtype=dtype)  # one tensor through the map
            set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)  # meta params are float32
        members = {fqn for fqn in linears if block_of(f"{fqn}.weight") == block}
        fused += lightning.fuse_pairs(model, pairs, members)
        if config is not None:
            quantize_(model, config, filter_fn=lambda m, fqn, members=members: fqn in members)
        if home != device:
            model.get_submodule(block).to(home)
    model.to(home)  # buffers made outside the files (RoPE tables) follow
    seconds = time.perf_counter() - started
    where = f"{torch.device(device).type}, block by block from the files"
    log.info("transformer read %s in %.1f s (%d blocks, LoRA fused into %d layers, quantised to %s, kept on %s)",
             where, seconds, len(blocks), fused, quantise_to or "-", home)
    return model, {"where": where, "blocks": len(blocks), "seconds": round(seconds, 2), "lora_layers": fused}
