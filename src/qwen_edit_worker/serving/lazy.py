"""Load once per process, in the background, and let jobs wait only for what is left.

Why this exists: a serverless container should be up at once (RunPod marks a worker unhealthy
after a long silent start), yet the model takes seconds to minutes to load.  With WARMUP=1 the
worker starts loading in a background thread when it starts; with WARMUP=0 the first job starts
it.  Either way the load runs once, every job that arrives before it ends waits and says so
(cold start), and a failed load is logged once with its cause and reported to every job.
A failure the loader foresaw (a WorkerError naming a setting or file) is told apart from an
unforeseen one (CUDA, memory, a broken install): the worker treats the two differently
(serving/worker.py: a machine's fault asks RunPod for a new worker).

A load can also publish a part of its value before it ends (`publish`, `part`): the text stage,
once the text encoder is in, lets a job that is waiting encode its prompt while the transformer
is still being read (serving/early_text.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..errors import ModelLoadError, WorkerError

log = logging.getLogger(__name__)
T = TypeVar("T")


class LazyLoad(Generic[T]):
    """A value built once by `load` in a background thread; `get` waits for it."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self._start_lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._value: T | None = None
        self._error: WorkerError | None = None
        self._parts: dict[str, Any] = {}
        self._published = threading.Condition()
        self.unforeseen: BaseException | None = None  # the original error when the load failed unforeseen

    @property
    def ready(self) -> bool:
        return self._done.is_set()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def error(self) -> WorkerError | None:
        """The load's error once it has ended (None while loading, or after a good load)."""
        return self._error if self._done.is_set() else None

    def start(self) -> None:
        """Begin loading in the background, if not begun yet."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="model-load", daemon=True)
                self._thread.start()

    def get(self) -> tuple[T, bool, float]:
        """(value, whether this call waited for loading, seconds waited); raise the load's error."""
        waited = not self._done.is_set()
        started = time.perf_counter()
        if waited:
            self.start()
            self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value, waited, time.perf_counter() - started if waited else 0.0

    def publish(self, name: str, value: Any) -> None:
        """Called by the load: `value` is ready for jobs to use before the whole load ends."""
        with self._published:
            self._parts[name] = value
            self._published.notify_all()

    def part(self, name: str) -> tuple[Any, float]:
        """(the published part `name`, seconds waited), once it is published; (None, seconds) when the load ended
        without publishing it; the load's error when it failed first.  Starts the load if needed."""
        started = time.perf_counter()
        self.start()
        with self._published:
            while name not in self._parts and not self._done.is_set():
                self._published.wait(0.5)
            value = self._parts.get(name)
        if value is None and self._error is not None:
            raise self._error
        return value, time.perf_counter() - started

    def wait(self) -> WorkerError | None:
        """Start loading if needed, wait for the end, and return the load's error (None on success)."""
        self.start()
        self._done.wait()
        return self._error

    def _run(self) -> None:
        try:
            self._value = self._load()
        except WorkerError as err:
            log.error("model load failed: %s", err)
            self._error = err
        except Exception as err:  # anything else: keep the traceback in the log, a short cause for jobs
            log.exception("model load failed")
            self.unforeseen = err
            self._error = ModelLoadError("model", f"loading failed ({type(err).__name__}: {err}); see the worker log")
        finally:
            self._done.set()
            with self._published:
                self._parts.clear()  # a part is for jobs that came before the end; after it, the whole value
                self._published.notify_all()
