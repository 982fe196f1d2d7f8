"""Precision: which weights are quantised, to what, on which GPUs, with which torchao configuration.

Why this exists: the transformer (20.4 B parameters) and the text encoder (8.3 B) are most of
the 58 GB a worker reads and holds, and their matrix products are most of a job's arithmetic.
Quantising them is what lets the model fit a 24 or 48 GB GPU without offload, and it is done in
two places that must agree: at build time (builder/bake.py stores the quantised weights) and at
load time (the worker quantises bf16 weights itself).  Both use the definitions here.

- `int8`: int8 weights (per-row scales) and int8 activations quantised on the fly
  (torchao `Int8DynamicActivationInt8WeightConfig`; `torch._int_mm`).  The int8 matrix units
  exist from Ampere (sm80) on; the same kernels also run on a CPU, which makes int8 testable.
- `fp8`: float8 e4m3 weights and activations with per-row scales
  (`Float8DynamicActivationFloat8WeightConfig`).  Runs on Ada and Hopper (sm89+) only.  torchao
  refuses to create it on a machine without such a GPU, CPU tensors included; the bake makes it on
  the CPU anyway, with torchao's own code and that check answered inside the call (fp8_cpu.py).

Which layers: every `nn.Linear` of the transformer (after the Lightning LoRA is fused: a bf16
LoRA over quantised weights gave grid artifacts upstream).  In the text encoder, the language
model's linear layers and `lm_head`; the vision tower (`model.visual`, 0.67 B parameters, 8% of
the encoder, run once per job on a 384x384 picture) stays bf16: it is the part that reads the
picture, and keeping it exact costs little memory.  Embeddings are lookups, not matrix products,
and stay as they are.

`lm_head` (0.545 B parameters, 1.09 GB in bf16): the worker computes the encoder's hidden states
only and drops lm_head at load (model/text_phase.py), so on the real graph it runs no FLOPs and
keeps no activations, and no placement holds it.  Its one remaining cost is the bytes every cold
start reads, so the bake still quantises it with the rest of the language model: int8/fp8 halves
those bytes (0.55 GB instead of 1.09), and its precision cannot change an edit.  A load that
quantises a bf16 bake skips it (it is gone before quantisation); a head tied to the input
embedding is the embedding, and is neither quantised nor dropped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)
PRECISIONS = ("bf16", "int8", "fp8")  # the values of TEXT_ENCODER_PRECISION and of a bake
PRECISION_SETTINGS = (*PRECISIONS, "auto")  # PRECISION also takes auto (resolve)
QUANTISED = PRECISIONS[1:]
MIN_CAPABILITY = {"int8": (8, 0), "fp8": (8, 9)}
GPU_NAMES = {"int8": "Ampere, Ada or Hopper", "fp8": "Ada or Hopper"}
TEXT_ENCODER_KEPT = ("model.visual",)  # module prefixes the text encoder keeps in bf16
# The same modules under the names a checkpoint stores them by: transformers saves Qwen2.5-VL's vision tower as
# `visual.` (the published Qwen-Image folders; transformers 5's save_pretrained maps `model.visual.` back to it).
STORED_KEPT = {"text_encoder": ("visual.", "model.visual.")}
# Stored bytes of one quantised linear weight, as torchao 0.18 saves it: (per element, per output row).
# int8: int8 qdata, a float32 scale and an int8 zero point per row; fp8: e4m3 qdata, a float32 scale per row.
STORED_BYTES = {"bf16": (2, 0), "int8": (1, 5), "fp8": (1, 4)}


def check(precision: str, setting: str, cuda: bool, capability: tuple[int, int] | None, baked: str = "bf16") -> None:
    """Raise ModelLoadError naming `setting` when this machine cannot run `precision`.

    int8 runs on a CPU (slowly) and on CUDA GPUs of compute capability 8.0+; fp8 needs 8.9+.  When the
    weights are `baked` at `precision` (an fp8 bake, say), no other setting can help on this machine:
    the message says to run the image on such a GPU or to bake another precision.
    """
    if precision not in QUANTISED:
        return
    need = MIN_CAPABILITY[precision]
    if not cuda or capability is None:
        if precision == "fp8":
            raise ModelLoadError(setting, "fp8 needs a CUDA GPU with float8 units (Ada or Hopper); "
                                          + _instead(setting, precision, baked, "bf16 or int8"))
        return
    if capability < need:
        raise ModelLoadError(setting, f"{precision} needs compute capability {need[0]}.{need[1]} or newer "
                                      f"({GPU_NAMES[precision]}); this GPU is {capability[0]}.{capability[1]}; "
                                      + _instead(setting, precision, baked,
                                                 "bf16 or int8" if capability >= (8, 0) else "bf16"))


def _instead(setting: str, precision: str, baked: str, usable: str) -> str:
    """What to do instead: another value of `setting`, or (weights baked at `precision`) another GPU or bake."""
    if baked != precision:
        return f"use {usable}"
    flag = {"PRECISION": "--precision", "TEXT_ENCODER_PRECISION": "--text-encoder-precision"}.get(setting, setting)
    rebake = " or ".join(f"{flag} {value}" for value in usable.split(" or "))
    return (f"the image's weights are baked {precision} (manifest.json), so no other {setting} loads them: run it "
            f"on an {GPU_NAMES[precision]} GPU, or bake with {rebake}")


def resolve(precision: str, cuda: bool, capability: tuple[int, int] | None, baked: str = "bf16") -> str:
    """PRECISION=auto made concrete; any other value is returned as it is.

    auto: what a quantised bake stored; else fp8 on Ada and Hopper (compute capability 8.9+), int8
    on Ampere (8.0+), bf16 on older GPUs and without one (a CPU runs int8, but slowly: auto does not
    choose it there).  The transformer is 20.5 GB either way, so the placement is the same.
    """
    if precision != "auto":
        return precision
    if baked != "bf16":
        return baked
    if not cuda or capability is None:
        return "bf16"
    return "fp8" if capability >= MIN_CAPABILITY["fp8"] else "int8" if capability >= MIN_CAPABILITY["int8"] else "bf16"


def linear_weight_bytes(rows: int, columns: int, precision: str) -> int:
    """Bytes a (rows x columns) linear weight takes when stored at `precision` (scales included)."""
    per_element, per_row = STORED_BYTES[precision]
    return rows * columns * per_element + rows * per_row


def torchao_config(precision: str) -> Any:
    """The torchao configuration for `precision` (int8 or fp8)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
    )

    if precision == "int8":
        return Int8DynamicActivationInt8WeightConfig()
    if precision == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise ValueError(f"no quantisation for precision {precision!r}")


def text_encoder_kept(tied_lm_head: bool) -> list[str]:
    """Text-encoder modules that stay unquantised (transformers' `modules_to_not_convert` form)."""
    return [*TEXT_ENCODER_KEPT, *(["lm_head"] if tied_lm_head else [])]


def stored_quantised(component: str, name: str) -> bool:
    """Whether the linear weight stored as `name` in `component`'s files is one this module quantises.

    Every linear of the transformer; the text encoder's language-model linears and lm_head (the bake's; a tied
    lm_head is not stored apart), not its vision tower.  The planner sizes a folder by this (placement/planner.py
    folder_bytes, which leaves the dropped lm_head out of what is held).
    """
    return not name.startswith(STORED_KEPT.get(component, ()))


def lm_head_tied(text_encoder: Any) -> bool:
    """Whether the encoder's lm_head is its input embedding (a dropped head, model/text_phase.py, is not)."""
    head, embed = text_encoder.get_output_embeddings(), text_encoder.get_input_embeddings()
    weight = getattr(head, "weight", None)
    return weight is not None and embed is not None and weight is embed.weight


def quantise_transformer(transformer: Any, precision: str) -> None:
    """Quantise every linear layer of the transformer in place (after the LoRA is fused)."""
    from torchao.quantization import quantize_

    started = time.perf_counter()
    quantize_(transformer, torchao_config(precision))
    log.info("precision: transformer quantised to %s in %.1f s", precision, time.perf_counter() - started)


def quantise_text_encoder(text_encoder: Any, precision: str) -> None:
    """Quantise the text encoder's language-model linear layers (and untied lm_head) in place."""
    from torchao.quantization import quantize_

    started = time.perf_counter()
    quantize_(text_encoder, torchao_config(precision), filter_fn=text_encoder_chosen(text_encoder))
    log.info("precision: text encoder quantised to %s in %.1f s (vision tower kept)", precision,
             time.perf_counter() - started)


def text_encoder_chosen(text_encoder: Any) -> Any:
    """The filter (module, fqn) -> bool of the text encoder's layers to quantise (as `quantise_text_encoder`)."""
    import torch

    kept = tuple(f"{p}." for p in text_encoder_kept(lm_head_tied(text_encoder)))
    return lambda module, fqn: isinstance(module, torch.nn.Linear) and not f"{fqn}.".startswith(kept)


def quantise_by_block(module: Any, precision: str, device: Any, home: Any, chosen: Any = None) -> dict[str, Any]:
    """Quantise `module`'s chosen linear layers one block at a time on `device`, leaving each on `home`.

    A block is an element of a ModuleList (a transformer block, a language-model layer); a chosen
    linear outside any list is a block of its own.  Only that block's linear weights are on `device`
    at once (beside whatever already lives there), so a 24 GB GPU holding the resident int8
    transformer can still quantise a 16.6 GB bf16 text encoder, and the whole bf16 transformer never
    has to fit the GPU: each quantised block lands where the placement wants it (`home`: the GPU when
    it stays resident, the CPU when it is offloaded).  The CPU copy of each bf16 weight is dropped as
    its block moves, so host memory only ever shrinks.  The result equals quantising the whole
    module at once (the same torchao configuration, layer by layer: a test compares the pixels).
    Returns {"where", "blocks", "seconds"} for the log and the job's `model` block.
    """
    import torch
    from torchao.quantization import quantize_

    chosen = chosen or (lambda m, fqn: isinstance(m, torch.nn.Linear))
    started = time.perf_counter()
    lists = [name for name, m in module.named_modules() if isinstance(m, torch.nn.ModuleList)]
    blocks: dict[str, list[str]] = {}
    for fqn, sub in module.named_modules():
        if chosen(sub, fqn) and not isinstance(getattr(sub, "weight", None), _quantised_type()):
            blocks.setdefault(_block_of(fqn, lists), []).append(fqn)
    config = torchao_config(precision)
    for names in blocks.values():
        members = set(names)
        for name in names:
            module.get_submodule(name).to(device)
        quantize_(module, config, filter_fn=lambda m, fqn, members=members: fqn in members)
        if str(home) != str(device):
            for name in names:
                module.get_submodule(name).to(home)
    seconds = time.perf_counter() - started
    where = f"{torch.device(device).type}, block by block"
    log.info("precision: %s quantised to %s on %s in %.1f s (%d blocks, kept on %s)", type(module).__name__,
             precision, where, seconds, len(blocks), home)
    return {"where": where, "blocks": len(blocks), "seconds": round(seconds, 2)}


def _block_of(fqn: str, lists: list[str]) -> str:
    """`a.layers.3` for `a.layers.3.mlp.up`, when `a.layers` is a ModuleList; else the layer's own name."""
    for name in sorted(lists, key=len):  # the outermost list: a whole block, not its MLP's inner list
        prefix = f"{name}." if name else ""
        if fqn.startswith(prefix):
            index = fqn[len(prefix):].split(".", 1)[0]
            if index.isdigit():
                return f"{prefix}{index}"
    return fqn


def _quantised_type() -> type:
    from torchao.utils import TorchAOBaseTensor

    return TorchAOBaseTensor


def quantised_linears(module: Any) -> int:
    """How many linear layers of `module` hold torchao-quantised weights (for tests and logs)."""
    quantised = _quantised_type()
    return sum(isinstance(getattr(m, "weight", None), quantised) for m in module.modules())
