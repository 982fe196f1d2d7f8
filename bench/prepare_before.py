"""The bake's preparation as it was before it streamed (main at 5041f90): the 'before' of bench/bake and the
reference tests/test_stream.py compares the streamed bake with, bit for bit.

Why this is kept, and here: weights/prepare.py now streams shard by shard (weights/stream.py); this is the
whole-module path it replaced, unchanged but for its imports: it builds the whole transformer with
`from_pretrained`, fuses the Lightning LoRA (weights/lightning.py), saves it, builds it again with a
TorchAoConfig to quantise it, and saves again (the text encoder likewise, once).  Its memory grows with the
model (bench/bake measures it).  It lives in bench/, not in the worker's package: the image does not carry it.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from qwen_edit_worker.weights import fp8_cpu, lightning, precision
from qwen_edit_worker.weights.errors import ModelLoadError
from qwen_edit_worker.weights.prepare import PrepareError, check_can_quantise

log = logging.getLogger(__name__)
STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
GRANULARITIES = {"PerRow": "per-row", "PerTensor": "per-tensor"}  # torchao's classes, as the manifest names them


def prepare(folder: Path, lora: Path | None, lora_ref: str | None, transformer_precision: str,
            text_encoder_precision: str) -> dict[str, Any]:
    """Fuse `lora` (when given) and quantise in `folder`; return the manifest's `prepared` block."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # a build log, not a terminal
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    for flag, value in (("--precision", transformer_precision), ("--text-encoder-precision", text_encoder_precision)):
        check_can_quantise(flag, value)
    index = json.loads((folder / "model_index.json").read_text())
    layers = None
    if lora is not None:
        layers = _fuse(folder, index, lora)
        if lora.parent.name == "lightning":  # the baked layout: the folder holds only the LoRA
            shutil.rmtree(lora.parent)
        else:
            lora.unlink()
    quantised = {}
    if transformer_precision != "bf16":
        quantised["transformer"] = _quantise_diffusers(folder / "transformer", index["transformer"][1],
                                                       transformer_precision)
    if text_encoder_precision != "bf16":
        quantised["text_encoder"] = _quantise_transformers(folder / "text_encoder", index["text_encoder"][1],
                                                           text_encoder_precision)
    seconds = round(time.perf_counter() - started, 1)
    log.info("prepared in %.1f s: LoRA %s, transformer %s, text encoder %s", seconds,
             f"fused ({layers} layers)" if layers else "not fused", transformer_precision, text_encoder_precision)
    return {"fused_lora": lora_ref if lora is not None else None, "fused_layers": layers,
            "precision": {"transformer": transformer_precision, "text_encoder": text_encoder_precision},
            **({"quantised": quantised} if quantised else {}), "seconds": seconds}


def stored_dtype(component: Path) -> Any:
    """The torch dtype of the component's first floating-point weight, read from a safetensors header."""
    import torch

    for path in sorted(component.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name != "__metadata__" and tensor["dtype"] in STORED_DTYPES:
                return getattr(torch, STORED_DTYPES[tensor["dtype"]])
    raise PrepareError(f"{component.name}/ has no floating-point safetensors weights")


def _fuse(folder: Path, index: dict[str, Any], lora: Path) -> int:
    import diffusers

    transformer_class = getattr(diffusers, index["transformer"][1])
    transformer = transformer_class.from_pretrained(folder / "transformer", dtype=stored_dtype(folder / "transformer"))
    # A pipeline holding only the transformer: the worker's own load/check/fuse/unload code runs unchanged.
    pipe = getattr(diffusers, index["_class_name"])(transformer=transformer, vae=None, text_encoder=None,
                                                    tokenizer=None, processor=None, scheduler=None)
    try:
        layers = lightning.fuse_lightning(pipe, lora, "--fuse-lightning")
    except ModelLoadError as err:
        raise PrepareError(str(err)) from None
    _replace(folder / "transformer", lambda out: pipe.transformer.save_pretrained(out, safe_serialization=True))
    return layers


def _quantise_diffusers(component: Path, class_name: str, value: str) -> dict[str, Any]:
    import diffusers

    config = diffusers.TorchAoConfig(precision.torchao_config(value))
    with fp8_cpu.answered() if value == "fp8" else nullcontext():
        model = getattr(diffusers, class_name).from_pretrained(component, quantization_config=config,
                                                               dtype=_read_dtype(component, value))
    record = _record(component.name, model, value, config.quant_type)
    _replace(component, lambda out: model.save_pretrained(out, safe_serialization=True))
    return record


def _quantise_transformers(component: Path, class_name: str, value: str) -> dict[str, Any]:
    import transformers

    tied = bool(getattr(transformers.AutoConfig.from_pretrained(component), "tie_word_embeddings", False))
    config = transformers.TorchAoConfig(precision.torchao_config(value),
                                        modules_to_not_convert=precision.text_encoder_kept(tied))
    with fp8_cpu.answered() if value == "fp8" else nullcontext():
        model = getattr(transformers, class_name).from_pretrained(component, quantization_config=config,
                                                                  dtype=_read_dtype(component, value))
    record = _record(component.name, model, value, config.quant_type)
    _replace(component, lambda out: model.save_pretrained(out, safe_serialization=True))
    return record


def _read_dtype(component: Path, value: str) -> Any:
    """fp8 reads bf16 (torchao's per-row fp8 takes bf16 only, as the worker reads it on a GPU); else as stored."""
    import torch

    return torch.bfloat16 if value == "fp8" else stored_dtype(component)


def _record(name: str, model: Any, value: str, config: Any) -> dict[str, Any]:
    """The manifest's account of one quantised component (or PrepareError when nothing was quantised)."""
    import torchao

    count = precision.quantised_linears(model)
    if count == 0:
        raise PrepareError(f"{name}: quantising to {value} changed no layer")
    made_on = sorted({p.device.type for p in model.parameters()})
    log.info("%s: %d linear layers quantised to %s on %s", name, count, value, ", ".join(made_on))
    granularities = config.granularity if isinstance(config.granularity, list | tuple) else [config.granularity]
    granularity = {GRANULARITIES.get(type(g).__name__, type(g).__name__) for g in granularities}
    record = {"precision": value, "made_on": ", ".join(made_on), "torchao": torchao.__version__,
              "config": type(config).__name__, "granularity": ", ".join(sorted(granularity)), "layers": count}
    if value == "fp8" and made_on == ["cpu"]:
        record["hardware_check"] = fp8_cpu.HARDWARE_CHECK
    return record


def _replace(component: Path, write: Callable[[Path], None]) -> None:
    """Write a component beside the old one, then swap it in (never a half-written component)."""
    new = component.with_name(f".{component.name}.new")
    shutil.rmtree(new, ignore_errors=True)
    write(new)
    old = component.with_name(f".{component.name}.old")
    component.replace(old)
    new.replace(component)
    shutil.rmtree(old)
