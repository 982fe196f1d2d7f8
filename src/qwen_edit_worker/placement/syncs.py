"""Host synchronisations counted: every place a run would make the CPU wait for the GPU.

Why this exists: the denoising loop must never wait for the GPU (a wait in every linear layer cost
torchao's int8 path a device-to-host copy per layer, weights/int8_mm.py), and no CPU test can see
a wait happen.  What can be seen, on any machine, is the operation that would cause one, when the
tensors are on a (fake) CUDA device: reading a value (`item`, `tolist`, `bool()`, `int()`: aten
`_local_scalar_dense`), copying to the host (`cpu()`, `to("cpu")`: aten `_to_copy`/`copy_` from cuda to
cpu), formatting a tensor (`repr`, `str`, f-strings: Tensor and FakeTensor `__repr__`), and
operations whose output size depends on the data (`nonzero`, `masked_select`, `unique`, boolean
indexing).  `counting()` counts them while a block runs, by kind, and remembers where the first of
each kind was made.  Under fake tensors a value read has no data: the counter answers it with 1 (or
True; `nonzero` with one hit at 0) and counts it, so the run goes on and every later one is
counted too.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim")


@dataclass
class Syncs:
    """What was counted: {kind: count}, and for each kind the innermost project or library line of its first one."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str) -> None:
        self.counts[kind] += 1
        if kind not in self.first:
            frames = [f for f in traceback.extract_stack()[:-2] if "placement/syncs.py" not in f.filename
                      and "/torch/" not in f.filename]
            self.first[kind] = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _on_cuda(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


@contextmanager
def counting() -> Iterator[Syncs]:
    """Count, inside the block, the operations that make the host wait for a CUDA device."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = Syncs()
    aten = torch.ops.aten

    class Counting(TorchDispatchMode):
        supports_higher_order_operators = True  # torchao's int8 matmul goes through out_dtype

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if isinstance(func, torch._ops.HigherOrderOperator):
                return func(*args, **kwargs)  # its inner ops come back through here
            name = func.overloadpacket.__name__
            if func is aten._local_scalar_dense.default:
                if _on_cuda(args[0]):
                    seen.add("read a value (item/tolist/bool/int)")
                if isinstance(args[0], FakeTensor):  # no data (on the CPU either): a stand-in, not counted there
                    return _placeholder(args[0])
            if name in ("_to_copy", "copy_") and _to_host(func, args, kwargs):
                seen.add("copy to the host")
            elif name in DATA_DEPENDENT and any(_on_cuda(a) for a in args):
                seen.add(f"data-dependent size ({name})")
                if name == "nonzero" and isinstance(args[0], FakeTensor):  # no data, no size: one hit, at 0
                    return torch.zeros((1, args[0].dim()), dtype=torch.long, device=args[0].device)
            return func(*args, **kwargs)

    inside = [0]  # repr re-enters itself through torch-function modes: count the outermost call

    def formatting(original: Any) -> Any:
        def counted(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if tensor.device.type == "cuda" and not inside[0]:
                seen.add("format a tensor (repr/str)")
            inside[0] += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                inside[0] -= 1

        return counted

    patched = [(cls, cls.__dict__["__repr__"]) for cls in (torch.Tensor, FakeTensor) if "__repr__" in cls.__dict__]
    for cls, original in patched:
        cls.__repr__ = formatting(original)
    try:
        with Counting():
            yield seen
    finally:
        for cls, original in patched:
            cls.__repr__ = original


def _to_host(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a `_to_copy` or `copy_` moves a CUDA tensor's data to the CPU."""
    import torch

    if func.overloadpacket is torch.ops.aten.copy_:  # copy_(dst, src)
        destination, source = args[0], args[1] if len(args) > 1 else None
        return _on_cuda(source) and isinstance(destination, torch.Tensor) and destination.device.type == "cpu"
    device = kwargs.get("device")
    return _on_cuda(args[0]) and device is not None and torch.device(device).type == "cpu"


def _placeholder(tensor: Any) -> Any:
    """A stand-in value for a read that fake tensors cannot answer."""
    import torch

    if tensor.dtype == torch.bool:
        return True
    return 1.0 if tensor.dtype.is_floating_point else 1


def transformer_forward(precision: str, layers: int, image_tokens: int = 2 * 4096, text_tokens: int = 320) -> Syncs:
    """The syncs of one transformer forward (2511, batch 1; default: 1 MP out, one 1 MP picture) on fake CUDA."""
    import torch

    from . import fakecuda

    side = int((image_tokens // 2) ** 0.5)
    with fakecuda.fake_cuda():
        model = fakecuda.transformer(True, precision, layers=layers)
        with torch.no_grad():
            latents = torch.randn(1, image_tokens, 64, dtype=torch.bfloat16)
            text = torch.randn(1, text_tokens, 3584, dtype=torch.bfloat16)
            timestep = torch.full((1,), 0.5, dtype=torch.bfloat16)
            with counting() as seen:
                model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                      img_shapes=[[(1, side, side), (1, side, side)]], return_dict=False)
    return seen


def main(argv: list[str] | None = None) -> int:
    """`python -m qwen_edit_worker.placement.syncs [--layers 60]`: the counts, as JSON, with torchao's own int8
    matmul and with the worker's (weights/int8_mm.py).  A command's answer, so it prints."""
    import argparse
    import importlib
    import json

    from torchao.kernel import intmm

    from ..weights import int8_mm

    parser = argparse.ArgumentParser(prog="python -m qwen_edit_worker.placement.syncs")
    parser.add_argument("--layers", type=int, default=60)
    args = parser.parse_args(argv)
    target = importlib.import_module(int8_mm.TARGET)
    answer: dict[str, object] = {"layers": args.layers}
    for name, matmul in (("torchao", intmm.int_scaled_matmul), ("worker", int8_mm.int_scaled_matmul)):
        int8_mm.install()
        target.int_scaled_matmul = matmul
        answer[name] = {p: dict(transformer_forward(p, args.layers).counts) for p in ("bf16", "int8", "fp8")}
    int8_mm.install()
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
