"""Adapter slots: request LoRAs loaded on the transformer, switched per job, never left active.

Why this exists: loading a LoRA into the transformer costs a file read and peft's module
injection, so the last LORA_SLOTS LoRAs stay loaded as named PEFT adapters (`lora_<sha256>`,
on top of the fused Lightning weights), and a job that asks for one of them only activates it.
`applied` is used inside the GPU section around the pipeline call: it loads what is missing
(evicting the least recently used slot the job does not need), activates the job's set with its
scales, and in `finally` disables every adapter.  With adapters disabled, peft's layers return
their base layer's output unchanged, so a job without LoRAs gives exactly the pixels it gave
before any LoRA job (tests/test_loras_worker.py pins it).

A file whose keys match no layer of this transformer loads nothing in diffusers (a warning only):
the layers peft really created for the adapter are counted, and none is a RequestError.
Under COMPILE=regional the slots are the hot-swap ones of loras/hotswap.py instead (both kinds
share `Slots`: the job's set switched on inside `applied`, everything off after).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..accounting.timing import StageClock
from ..errors import RequestError
from .fetch import Fetched

log = logging.getLogger(__name__)


def adapter_name(sha256: str) -> str:
    return f"lora_{sha256[:16]}"


class Slots:
    """What both kinds of slots share: LRU bookkeeping, the count check, and switched on only inside `applied`."""

    def __init__(self, pipe: Any, max_slots: int) -> None:
        self.pipe = pipe
        self.max_slots = max_slots
        self.loaded: OrderedDict[str, int] = OrderedDict()  # sha256 -> layers, least recently used first
        self.loads = 0  # adapters loaded so far (tests and the benchmark read it)

    @contextmanager
    def applied(self, fetched: list[Fetched], clock: StageClock) -> Iterator[None]:
        """Inside: the job's LoRAs active at their scales (none: all off).  After: all off, always."""
        try:
            if fetched:
                with clock.stage("lora"):
                    self.activate(fetched)
            yield
        finally:
            self.deactivate()

    def wanted(self, fetched: list[Fetched]) -> set[str]:
        """The job's distinct LoRAs; more than the slots hold is a RequestError."""
        wanted = {f.sha256 for f in fetched}
        if len(wanted) > self.max_slots:
            raise RequestError("input.loras", f"{len(wanted)} different LoRAs, more than this worker keeps loaded "
                                              f"(LORA_SLOTS={self.max_slots})")
        return wanted

    def activate(self, fetched: list[Fetched]) -> None:
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def loaded_bytes(self) -> int:
        raise NotImplementedError


class AdapterSlots(Slots):
    """The request LoRAs loaded on one pipeline's transformer as named PEFT adapters (LRU, at most `max_slots`)."""

    def activate(self, fetched: list[Fetched]) -> None:
        wanted = self.wanted(fetched)
        for item in fetched:
            if item.sha256 not in self.loaded:
                self._make_room(wanted)
                self.loaded[item.sha256] = self._load(item)
            self.loaded.move_to_end(item.sha256)
            item.layers = self.loaded[item.sha256]
        scales: dict[str, float] = {}
        for item in fetched:  # the same file twice adds up, as two adapters of one file would
            name = adapter_name(item.sha256)
            scales[name] = scales.get(name, 0.0) + item.item.scale
        self.pipe.enable_lora()
        self.pipe.set_adapters(list(scales), adapter_weights=list(scales.values()))

    def deactivate(self) -> None:
        if self.loaded:
            self.pipe.disable_lora()

    def loaded_bytes(self) -> int:
        """Bytes the loaded adapters' weights hold (they count in the placement plan's headroom)."""
        names = {adapter_name(sha) for sha in self.loaded}
        total = 0
        for module in self.pipe.transformer.modules():
            for attribute in ("lora_A", "lora_B"):
                for name, part in getattr(module, attribute, {}).items():
                    if name in names:
                        total += sum(p.numel() * p.element_size() for p in part.parameters())
        return total

    def _make_room(self, wanted: set[str]) -> None:
        while len(self.loaded) >= self.max_slots:
            victim = next(sha for sha in self.loaded if sha not in wanted)
            del self.loaded[victim]
            self.pipe.delete_adapters([adapter_name(victim)])
            log.info("LoRA slots: unloaded %s (least recently used; LORA_SLOTS=%d)", victim[:12], self.max_slots)

    def _load(self, item: Fetched) -> int:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        field, name = f"{item.item.field}.path", adapter_name(item.sha256)
        try:
            state = load_file(str(item.file))
        except (SafetensorError, OSError) as err:
            raise RequestError(field, f"cannot read the LoRA file ({str(err)[:120]})") from None
        try:
            self.pipe.load_lora_weights(state, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            self._forget(name)
            detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise RequestError(field, f"the LoRA does not fit this model's transformer ({detail})") from None
        layers = sum(1 for m in self.pipe.transformer.modules() if name in getattr(m, "lora_A", {}))
        if layers == 0:
            self._forget(name)
            raise RequestError(field, "the LoRA's keys match no layer of this model's transformer: is it a LoRA "
                                      "for Qwen-Image(-Edit)? (diffusers/PEFT and ComfyUI/Kohya key names load)")
        if layers < item.declared_layers:
            log.warning("LoRA %s: %d of its %d layers matched this transformer", item.sha256[:12], layers,
                        item.declared_layers)
        self.loads += 1
        log.info("LoRA slots: loaded %s into %d layers (%d of %d slots)", item.sha256[:12], layers,
                 len(self.loaded) + 1, self.max_slots)
        return layers

    def _forget(self, name: str) -> None:
        """Remove a half-loaded adapter, so a failed load leaves nothing behind."""
        if name in self.pipe.get_list_adapters().get("transformer", []):
            self.pipe.delete_adapters([name])
