"""Counting the bytes alive on the (fake) GPU while a phase runs: its peak, and its FLOPs.

Why this exists: the planner's activation model (placement/activations.py) is only as good as the
figures it is fitted to, and those come from running the real components on fake CUDA
(placement/fakecuda.py), where no allocator exists to ask.  `PeakMemory` is a TorchDispatchMode
that sees every op's outputs, adds each new CUDA storage's bytes (rounded up to the caching
allocator's 512-byte blocks) when it appears and takes them off when the storage is freed (a
finaliser on the storage, as torch.distributed._tools.mem_tracker does).  Storages that existed
before it was entered (the weights) are not counted: its peak is what the phase adds.  FLOPs come
from torch's own FlopCounterMode, which works on fake tensors.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

BLOCK = 512  # the CUDA caching allocator's rounding


def _storages(tensor: torch.Tensor) -> list[Any]:
    from torch.distributed._tools.common_utils import get_untyped_storages

    return list(get_untyped_storages(tensor))


class PeakMemory(TorchDispatchMode):
    """Bytes of CUDA storages created while entered and still alive; `peak` is their maximum."""

    supports_higher_order_operators = True  # torchao's int8 matmul goes through the `out_dtype` operator

    def __init__(self) -> None:
        super().__init__()
        self.alive = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for item in tree_flatten((args, kwargs))[0] if isinstance(item, torch.Tensor)
                  for s in _storages(item)}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if tensor.device.type != "cuda":  # a fake tensor's storage is on `meta`: ask the tensor
            return
        for storage in _storages(tensor):
            if storage in self._seen or id(storage) in inputs:  # a view or an in-place result: nothing new
                continue
            size = -(-storage.nbytes() // BLOCK) * BLOCK
            self._seen[storage] = size
            self.alive += size
            self.peak = max(self.peak, self.alive)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.alive -= size

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (the next phase's view)."""
        self.peak = self.alive


def flop_counter() -> Any:
    """torch's FlopCounterMode, quiet (use `.get_total_flops()` after the block)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)
