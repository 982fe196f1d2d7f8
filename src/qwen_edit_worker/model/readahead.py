"""Reading the weights into the page cache from the first moment of the load, in load order, in parallel.

Why this exists: a cold start reads 30 to 58 GB before the first step, and the worker's own
imports (torch, diffusers, transformers: seconds) come first.  Done one after the other the
start costs their sum; here the files are read while the imports run, so it costs the larger.
The loader then finds its bytes in the page cache: one read from disk, no second pass (the
loader's own copy out of the cache is the copy it makes anyway).

- Order: the order the load sequence consumes the folders (model/sequence.py: the text stage,
  then the transformer and the Lightning LoRA, then the safety checker), each folder's
  safetensors files in name order, read in chunks handed out front first.
- Parallel: several readers, each a chunk at a time, brought into the cache with MADV_POPULATE_READ
  on a mapping of the chunk (no copy out of the cache, and little CPU: the imports beside it need
  the CPU), or read into a buffer where the kernel lacks it; either releases the GIL, so the imports
  run meanwhile.  How many is the host's (model/readers.py: 4 a CPU the process may use, at most 16,
  or READAHEAD_READERS), and the line that starts the read-ahead says how many and why.
- Bounded: never more than `window` bytes ahead of what the load has consumed (half the memory
  the host has available when it starts, at least MIN_WINDOW), so a host smaller than the model
  does not evict the front before the loader reaches it; the load tells what it has consumed
  (`release`), and files whose contents went to the GPU leave the page cache then
  (POSIX_FADV_DONTNEED), giving the host's memory back for the rest.
Pure: no torch.  A file it cannot read is skipped (the loader then reads it itself and names
the error); nothing here can fail a load (a read-ahead that cannot start logs why and the load goes on).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ..settings import Settings
from . import readers, sources

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 1024**2
BUFFER_BYTES = 8 * 1024**2
MIN_WINDOW = 2 * 1024**3
POPULATE_READ = 22  # MADV_POPULATE_READ (Linux 5.14+; EINVAL before, and the reads take over)
LOAD_ORDER = ("text_encoder", "vae", "tokenizer", "processor", "scheduler", "transformer", "lightning",
              "safety_checker")


class ReadAhead:
    """Readers going through `files` in order, at most `window` bytes ahead of what was released."""

    def __init__(self, files: list[tuple[str, Path]], window: int, threads: int, chosen: str = "") -> None:
        self.files = [(group, path, path.stat().st_size) for group, path in files]
        self.window = window
        self.threads = threads
        self.chosen = chosen  # where the count came from (model/readers.py), for the log
        self.total = sum(size for _, _, size in self.files)
        self.read_bytes = 0
        self.seconds: float | None = None  # until every chunk was read (None while reading)
        self._chunks = [(path, offset, min(CHUNK_BYTES, size - offset), end)
                        for path, offset, size, end in _chunked(self.files)]
        self._next = 0
        self._released: set[str] = set()
        self._consumed = 0
        self._stopped = False
        self._lock = threading.Condition()
        self._started = 0.0
        self._running = 0

    def start(self) -> ReadAhead:
        self._started = time.perf_counter()
        self._running = self.threads
        try:
            for index in range(self.threads):
                threading.Thread(target=self._read, name=f"read-ahead-{index}", daemon=True).start()
        except RuntimeError:  # no thread left to start: those that did leave, and the caller goes without
            self.stop()
            raise
        log.info("read-ahead: %d files, %.1f GB, %d readers (%s), window %.1f GB", len(self.files),
                 self.total / 1e9, self.threads, self.chosen or "as given", self.window / 1e9)
        return self

    def release(self, groups: Iterable[str], device: str) -> None:
        """The load is done with these groups' files; on a GPU their pages are dropped from the cache."""
        with self._lock:
            fresh = set(groups) - self._released
            self._released |= fresh
            self._consumed = sum(size for group, _, size in self.files if group in self._released)
            self._lock.notify_all()
        if device.startswith("cuda"):
            for group, path, _ in self.files:
                if group in fresh:
                    _drop(path)

    def stop(self) -> None:
        """No more reading (the load ended): readers finish their chunk and leave."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def _take(self) -> tuple[Path, int, int] | None:
        with self._lock:
            while True:
                if self._stopped or self._next >= len(self._chunks):
                    return None
                path, offset, length, end = self._chunks[self._next]
                if end - self._consumed <= self.window:
                    self._next += 1
                    return path, offset, length
                self._lock.wait(0.5)

    def _read(self) -> None:
        buffer: list[memoryview] = []  # made only where MADV_POPULATE_READ is refused (16 readers: 128 MB)
        try:
            while (chunk := self._take()) is not None:
                path, offset, length = chunk
                done = _read_range(path, offset, length, buffer)
                with self._lock:
                    self.read_bytes += done
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.seconds = time.perf_counter() - self._started
                log.info("read-ahead: %.1f GB read in %.1f s (%.2f GB/s)%s", self.read_bytes / 1e9, self.seconds,
                         self.read_bytes / 1e9 / max(self.seconds, 1e-9), " (stopped early)" if self._stopped else "")


def _chunked(files: list[tuple[str, Path, int]]) -> Iterable[tuple[Path, int, int, int]]:
    """(path, offset, file size, position in the whole order at the chunk's end) for every chunk, in order."""
    position = 0
    for _, path, size in files:
        for offset in range(0, size, CHUNK_BYTES):
            yield path, offset, size, position + min(offset + CHUNK_BYTES, size)
        position += size


def _read_range(path: Path, offset: int, length: int, buffer: list[memoryview]) -> int:
    """Bring `length` bytes of `path` from `offset` into the page cache; the bytes brought in.

    MADV_POPULATE_READ (Linux 5.14+) on a mapping of the range reads it into the cache without copying it out
    (measured here on 6.1 GB: 3.6 s and 0.1 s of CPU, against 5-7 s and 4-10 s of kernel CPU for reads into a
    buffer, CPU the imports running beside it need), called through ctypes, which lets go of the GIL for the
    call (Python's own mmap.madvise holds it, and would stop the imports while each chunk is read); where the
    kernel lacks it, buffered reads through the reader's buffer (made on first need, kept in `buffer`;
    os.preadv lets go of the GIL too).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        if _populate(fd, offset, length):
            return length
        if not buffer:
            buffer.append(memoryview(bytearray(BUFFER_BYTES)))
        view = buffer[0]
        done = 0
        while done < length:
            got = os.preadv(fd, [view[:min(len(view), length - done)]], offset + done)
            if got <= 0:
                break
            done += got
        return done
    except OSError:
        return 0
    finally:
        os.close(fd)


def _populate(fd: int, offset: int, length: int) -> bool:
    """MADV_POPULATE_READ over a shared read-only mapping of the range; False where it cannot be done."""
    if _LIBC is None:
        return False
    address = _LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if address in (None, ctypes.c_void_p(-1).value):
        return False
    try:
        return _LIBC.madvise(address, length, POPULATE_READ) == 0
    finally:
        _LIBC.munmap(address, length)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc() if os.uname().sysname == "Linux" else None


def _drop(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_order(settings: Settings) -> list[tuple[str, Path]]:
    """(group, file) for every weights file the load of `settings` reads, in the order it reads them; [] for the
    tiny model, or when the folder cannot be found (the load then says why)."""
    if settings.tiny_model:
        return []
    try:
        source = sources.locate(settings.model_path, settings.variant)
    except Exception:  # the load names the problem; reading ahead is only an optimisation
        return []
    folders = {group: source.path / group for group in LOAD_ORDER}
    if source.lightning_dir is not None:
        folders["lightning"] = source.lightning_dir
    found: list[tuple[str, Path]] = []
    for group in LOAD_ORDER:
        if group == "lightning" and settings.lightning and not source.fused_lora:
            lora = settings.lora_path or source.default_lora(settings.variant)
            found += [(group, lora)] if lora.is_file() else []
        elif group != "lightning" and folders[group].is_dir():
            found += [(group, path) for path in sorted(folders[group].glob("*.safetensors"))]
    return found


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def start_for(settings: Settings) -> ReadAhead | None:
    """Start reading what the load of `settings` will read, with the host's reader count (or READAHEAD_READERS);
    None when there is nothing to read, or when the read-ahead cannot start (logged: the load reads for itself)."""
    files = load_order(settings)
    if not files:
        return None
    count = readers.choose(settings.readahead_readers)
    try:
        return ReadAhead(files, max(MIN_WINDOW, available_bytes() // 2), count.count, count.source).start()
    except (OSError, RuntimeError) as err:  # a file gone since it was listed; no thread could be started
        log.warning("read-ahead not started (%s: %s); the load reads the weights itself", type(err).__name__, err)
        return None
