"""Request LoRAs for the worker: what a job calls, in two places, and nothing more.

Why this exists: the job's story (serving/worker.py) should read as two lines: fetch the job's
LoRAs in its input stage (`fetch`, outside the GPU section, timed as `lora`), and apply them
around the pipeline call inside it (`applied`, timed as `lora` too, off again afterwards).  This
class holds the worker-wide parts (the disk cache, the in-flight downloads, the adapter slots of
the loaded pipeline: plain adapters, or under COMPILE=regional the hot-swap slots that `prepare`
makes at load) built from the settings, the cache only when a first job needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from ..accounting.timing import StageClock
from ..errors import RequestError, SettingsError
from ..settings import Settings
from .cache import LoraCache
from .fetch import Fetched, LoraFetcher
from .hotswap import CompiledSlots
from .request import LoraItem
from .slots import AdapterSlots
from .support import adapter_problem, compile_problem


class RequestLoras:
    """One per worker."""

    def __init__(self, settings: Settings, timeout_s: float | None = None) -> None:
        self.settings = settings
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._fetcher: LoraFetcher | None = None
        self._slots: dict[int, AdapterSlots | CompiledSlots] = {}
        self._resident_bytes = 0  # adapters left loaded after the last LoRA job (written on the GPU thread only)
        self._resident: frozenset[str] = frozenset()  # their sha256s

    @property
    def fetcher(self) -> LoraFetcher:
        with self._lock:
            if self._fetcher is None:
                s = self.settings
                try:
                    cache = LoraCache(s.lora_cache_dir, s.lora_cache_bytes)
                except OSError as err:
                    raise SettingsError("LORA_CACHE_DIR", f"cannot use {s.lora_cache_dir} for the LoRA cache "
                                                          f"({err.strerror or type(err).__name__})") from None
                extra = {} if self._timeout_s is None else {"timeout_s": self._timeout_s}
                self._fetcher = LoraFetcher(cache, max_bytes=s.lora_max_bytes, lora_dir=s.lora_dir,
                                            allow_loopback=s.allow_loopback_urls, hf_endpoint=s.hf_endpoint,
                                            hf_token=s.hf_token, **extra)
            return self._fetcher

    def fetch(self, items: tuple[LoraItem, ...], clock: StageClock) -> list[Fetched]:
        """The job's LoRAs on disk and checked (held until `release`); raise RequestError."""
        if not items:
            return []
        problem = adapter_problem(self.settings.precision) or compile_problem(self.settings.compile,
                                                                              self.settings.lora_max_rank)
        if problem:
            raise RequestError("input.loras", problem)
        with clock.stage("lora"):
            return self.fetcher.fetch_all(items)

    def slots(self, pipe: Any) -> AdapterSlots | CompiledSlots:
        with self._lock:
            slots = self._slots.get(id(pipe))
            if slots is None or slots.pipe is not pipe:
                slots = self._slots[id(pipe)] = AdapterSlots(pipe, self.settings.lora_slots)
            return slots

    def prepare(self, model: Any) -> CompiledSlots | None:
        """At load, before the first compiled call: make a COMPILE=regional transformer's LoRA slots."""
        s = self.settings
        if s.compile != "regional" or s.max_loras == 0 or s.lora_max_rank == 0 \
                or adapter_problem(s.precision) is not None:
            return None
        slots = CompiledSlots(model.pipe, s.lora_slots, s.lora_max_rank)
        with self._lock:
            self._slots[id(model.pipe)] = slots
        return slots

    def applied(self, model: Any, fetched: list[Fetched], clock: StageClock) -> AbstractContextManager[None]:
        """Wrap `model`'s (a LoadedModel's) pipeline call: the job's LoRAs active inside, none after.

        Until a job brings LoRAs there is nothing to switch (and `model.pipe` is not touched, so a
        benchmark's stand-in model without a pipeline runs too).
        """
        if not fetched and not self._slots:
            return nullcontext()
        return self._applied(self.slots(model.pipe), fetched, clock)

    @contextmanager
    def _applied(self, slots: AdapterSlots | CompiledSlots, fetched: list[Fetched], clock: StageClock
                 ) -> Iterator[None]:
        try:
            with slots.applied(fetched, clock):
                yield
        finally:  # on the GPU section's thread, which alone changes the adapters
            self._resident_bytes = slots.loaded_bytes()
            self._resident = frozenset(getattr(slots, "loaded", ()))

    def gpu_bytes(self, fetched: list[Fetched]) -> int:
        """GPU bytes the job's LoRAs will hold at most: adapters left loaded plus the job's new files.

        Safe from a job thread: it reads what the GPU thread last recorded, and a new file's size
        stands for its adapter (bf16 tensors as stored; an fp32 file loads cast to the model's dtype,
        so this over-counts).  The job's sizing (placement.fit_request) takes it from the room
        beside the weights.
        """
        new = sum(item.file.stat().st_size for item in fetched if item.sha256 not in self._resident)
        return self._resident_bytes + new

    def loaded_bytes(self) -> int:
        """Bytes of adapters loaded on the GPU now (the placement plan's headroom must cover them)."""
        return sum(slots.loaded_bytes() for slots in self._slots.values())

    @staticmethod
    def release(fetched: list[Fetched]) -> None:
        for item in fetched:
            item.release()

    @staticmethod
    def report(fetched: list[Fetched]) -> list[dict[str, Any]]:
        return [item.report() for item in fetched]
