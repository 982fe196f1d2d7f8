"""Request LoRAs on a COMPILE=regional transformer: fixed slots that LoRAs are hot-swapped into.

Why this exists: torch.compile guards on the modules and Python values a block's forward reads, so
the plain adapter slots (loras/slots.py) recompile the blocks for every new LoRA, scale or set of
LoRAs (measured: 17-22 s a job on the tiny model, and torch.compile gives up after 8).  Here the
shape of the model never changes after loading:
- at load, LORA_SLOTS adapters (`slot_0`, ...) are created on every linear layer of the transformer
  blocks, padded to LORA_MAX_RANK and all zero (diffusers' `enable_lora_hotswap`), all of them
  active, their scales tensors (peft's hotswap preparation);
- a new LoRA is copied into a free or least recently used slot in place (`hotswap=True`: layers it
  does not cover are zeroed); a job's scales are written into the scale tensors in place, every
  other slot's scale is 0;
- outside a LoRA job the adapters are disabled.  The compiled blocks so exist in two variants,
  adapters off and on, both compiled at load (`warm_up`), so no LoRA job recompiles.
Cost: a LoRA job computes every slot (LORA_SLOTS x rank LORA_MAX_RANK extra matrix products per
layer, zero or not); a job without LoRAs computes none.  A LoRA of a higher rank than
LORA_MAX_RANK, or one on layers outside the blocks, is a RequestError naming the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import RequestError
from .fetch import Fetched
from .slots import Slots

log = logging.getLogger(__name__)


class CompiledSlots(Slots):
    """LORA_SLOTS rank-padded adapters on one pipeline's transformer, made before it is compiled."""

    def __init__(self, pipe: Any, max_slots: int, rank: int) -> None:
        import torch
        from peft.tuners.lora import LoraLayer

        super().__init__(pipe, max_slots)
        self.rank = rank
        self.names = [f"slot_{k}" for k in range(max_slots)]
        self.slot_of: dict[str, str] = {}
        transformer = pipe.transformer
        linears = {name: m for name, m in transformer.named_modules()
                   if name.startswith("transformer_blocks.") and isinstance(m, torch.nn.Linear)}
        self.covered = set(linears)
        pipe.enable_lora_hotswap(target_rank=rank)
        for name in self.names:
            zero = {}
            for module_name, m in linears.items():
                zero[f"transformer.{module_name}.lora_A.weight"] = torch.zeros(rank, m.in_features)
                zero[f"transformer.{module_name}.lora_B.weight"] = torch.zeros(m.out_features, rank)
            pipe.load_lora_weights(zero, adapter_name=name)
        pipe.set_adapters(self.names, adapter_weights=[0.0] * max_slots)  # all active, for good
        self.layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
        for m in self.layers:  # tensors, written in place from now on: no value for dynamo to guard on
            for name in self.names:
                m.scaling[name] = torch.tensor(0.0, device=m.lora_A[name].weight.device)
        self._unit: dict[str, list[float]] = {name: [0.0] * len(self.layers) for name in self.names}
        pipe.disable_lora()
        log.info("LoRA slots for COMPILE=regional: %d slots of rank %d on %d layers", max_slots, rank, len(linears))

    @contextmanager
    def all_on(self) -> Iterator[None]:
        """Adapters on at scale 0 (for the warm-up that compiles the adapters-on variant)."""
        self.pipe.enable_lora()
        try:
            yield
        finally:
            self.pipe.disable_lora()

    def activate(self, fetched: list[Fetched]) -> None:
        wanted = self.wanted(fetched)
        for item in fetched:
            if item.sha256 not in self.loaded:
                slot = self._free_slot(wanted)
                self.loaded[item.sha256] = self._swap_in(item, slot)
                self.slot_of[item.sha256] = slot
            self.loaded.move_to_end(item.sha256)
            item.layers = self.loaded[item.sha256]
        scale = dict.fromkeys(self.names, 0.0)
        for item in fetched:
            scale[self.slot_of[item.sha256]] += item.item.scale
        for name in self.names:
            for m, unit in zip(self.layers, self._unit[name], strict=True):
                m.scaling[name].fill_(unit * scale[name])
        self.pipe.enable_lora()

    def deactivate(self) -> None:
        self.pipe.disable_lora()
        for m in self.layers:
            for name in self.names:
                m.scaling[name].fill_(0.0)

    def loaded_bytes(self) -> int:
        """Bytes the slots' weights hold (all slots, from load on; they count in the placement's headroom)."""
        return sum(p.numel() * p.element_size() for m in self.layers for part in (m.lora_A, m.lora_B)
                   for name in self.names if name in part for p in part[name].parameters())

    def _free_slot(self, wanted: set[str]) -> str:
        used = set(self.slot_of.values())
        for name in self.names:
            if name not in used:
                return name
        victim = next(sha for sha in self.loaded if sha not in wanted)
        del self.loaded[victim]
        return self.slot_of.pop(victim)

    def _swap_in(self, item: Fetched, slot: str) -> int:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        field = f"{item.item.field}.path"
        try:
            state = load_file(str(item.file))
        except (SafetensorError, OSError) as err:
            raise RequestError(field, f"cannot read the LoRA file ({str(err)[:120]})") from None
        try:
            converted = self.pipe.lora_state_dict(state)
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise RequestError(field, f"the LoRA's keys cannot be read ({str(err)[:120]})") from None
        down = {k: v for k, v in converted.items() if k.endswith(".lora_A.weight")}
        modules = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in down}
        matched = modules & self.covered
        if not matched:
            raise RequestError(field, "the LoRA's keys match no layer of this model's transformer: is it a LoRA "
                                      "for Qwen-Image(-Edit)? (diffusers/PEFT and ComfyUI/Kohya key names load)")
        outside = sorted(modules - self.covered)
        if outside:
            raise RequestError(field, f"the LoRA also changes layers outside the transformer blocks ({outside[0]}, "
                                      f"...), which a COMPILE=regional worker's LoRA slots do not cover")
        rank = max(v.shape[0] for v in down.values())
        if rank > self.rank:
            raise RequestError(field, f"the LoRA's rank is {rank}, above LORA_MAX_RANK={self.rank} (the rank this "
                                      "COMPILE=regional worker's LoRA slots hold)")
        try:
            self.pipe.load_lora_weights(converted, adapter_name=slot, hotswap=True)
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise RequestError(field, f"the LoRA does not fit this model's transformer ({detail})") from None
        self._unit[slot] = [float(m.scaling[slot]) for m in self.layers]  # alpha / rank, set by the swap
        for m in self.layers:
            m.scaling[slot].fill_(0.0)
        self.loads += 1
        log.info("LoRA slots: %s swapped into %s (%d layers)", item.sha256[:12], slot, len(matched))
        return len(matched)
