"""Build-time preparation of a baked pipeline folder: the Lightning LoRA fused, components stored quantised.

Why this exists: without it every cold start reads the LoRA file, fuses it into the 20 B
transformer, and (with PRECISION/TEXT_ENCODER_PRECISION set) quantises 28 B parameters, and the
image carries and the host reads the full bf16 weights.  builder/bake.py calls `prepare` once, on
the build machine (a CPU is enough for the fuse and for int8), and the worker then loads the
stored result as it is: `manifest.json`'s `prepared` block says what was done, and the loader
skips it (model/sources.py refuses settings that contradict it).

Order matters: the LoRA is fused in the checkpoint's own dtype first, then quantisation reads the
fused weights (a bf16 LoRA over quantised weights gave grid artifacts upstream).  Quantised
components are saved through diffusers' / transformers' `TorchAoConfig`, as safetensors with
torchao's metadata (torchao >= 0.16), so `from_pretrained` recognises them and loads them
quantised.  Each rewritten component is written beside the old one and swapped in only when whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import lightning, precision
from .errors import ModelLoadError

log = logging.getLogger(__name__)
STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


class PrepareError(Exception):
    """A preparation step failed or cannot run on this machine; the message says which and why."""


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
    if transformer_precision != "bf16":
        _quantise_diffusers(folder / "transformer", index["transformer"][1], transformer_precision)
    if text_encoder_precision != "bf16":
        _quantise_transformers(folder / "text_encoder", index["text_encoder"][1], text_encoder_precision)
    seconds = round(time.perf_counter() - started, 1)
    log.info("prepared in %.1f s: LoRA %s, transformer %s, text encoder %s", seconds,
             f"fused ({layers} layers)" if layers else "not fused", transformer_precision, text_encoder_precision)
    return {"fused_lora": lora_ref if lora is not None else None, "fused_layers": layers,
            "precision": {"transformer": transformer_precision, "text_encoder": text_encoder_precision},
            "seconds": seconds}


def check_can_quantise(flag: str, value: str) -> None:
    """int8 quantises anywhere; torchao creates fp8 weights only on a machine with an sm89+ GPU."""
    if value not in precision.PRECISIONS:
        raise PrepareError(f"{flag}: must be one of {', '.join(precision.PRECISIONS)} (got {value!r})")
    if value != "fp8":
        return
    import torch

    capability = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
    if capability is None or capability < precision.MIN_CAPABILITY["fp8"]:
        setting = "PRECISION" if flag == "--precision" else "TEXT_ENCODER_PRECISION"
        raise PrepareError(f"{flag}: fp8 weights can only be made on a machine with an Ada or Hopper GPU (torchao "
                           "refuses otherwise) and this build has none; bake int8, or bake bf16 and set "
                           f"{setting}=fp8 so the worker quantises at load on the GPU")


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


def _quantise_diffusers(component: Path, class_name: str, value: str) -> None:
    import diffusers

    config = diffusers.TorchAoConfig(precision.torchao_config(value))
    model = getattr(diffusers, class_name).from_pretrained(component, quantization_config=config,
                                                           dtype=stored_dtype(component))
    _check_quantised(component.name, model, value)
    _replace(component, lambda out: model.save_pretrained(out, safe_serialization=True))


def _quantise_transformers(component: Path, class_name: str, value: str) -> None:
    import transformers

    tied = bool(getattr(transformers.AutoConfig.from_pretrained(component), "tie_word_embeddings", False))
    config = transformers.TorchAoConfig(precision.torchao_config(value),
                                        modules_to_not_convert=precision.text_encoder_kept(tied))
    model = getattr(transformers, class_name).from_pretrained(component, quantization_config=config,
                                                              dtype=stored_dtype(component))
    _check_quantised(component.name, model, value)
    _replace(component, lambda out: model.save_pretrained(out, safe_serialization=True))


def _check_quantised(name: str, model: Any, value: str) -> None:
    count = precision.quantised_linears(model)
    if count == 0:
        raise PrepareError(f"{name}: quantising to {value} changed no layer")
    log.info("%s: %d linear layers quantised to %s", name, count, value)


def _replace(component: Path, write: Callable[[Path], None]) -> None:
    """Write a component beside the old one, then swap it in (never a half-written component)."""
    new = component.with_name(f".{component.name}.new")
    shutil.rmtree(new, ignore_errors=True)
    write(new)
    old = component.with_name(f".{component.name}.old")
    component.replace(old)
    new.replace(component)
    shutil.rmtree(old)
