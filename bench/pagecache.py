"""Page-cache control for the cold-start bench: flush a folder's files, drop them from memory, check what stayed.

Why this exists: a cold start reads the weights from the disk, but a folder just written (or read by the
last run) sits in the page cache, and reading it from there runs at memory speed: every "cold" figure
would be a warm one.  Dropping the whole cache (`echo 3 > /proc/sys/vm/drop_caches`) needs root and
slows everyone on a shared machine; for one folder `posix_fadvise(POSIX_FADV_DONTNEED)` on each of its
files is enough, once they are flushed (dirty pages are not dropped).  The drop is checked, never
assumed: `mincore` on a mapping of each file says which of its pages are in memory (mapping a file
reads nothing).  On a filesystem that lives in memory (tmpfs) nothing can be dropped, and the check
says so instead of timing memory as if it were a disk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PAGE = mmap.PAGESIZE
MAX_RESIDENT_FRACTION = 0.03  # "cold" allows a few percent (a page or two per file, other readers)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore: bit 0 says resident, the other bits are reserved


class StillCached(RuntimeError):
    """The folder stayed in memory after a drop: a timed read would measure memory, not the disk."""


def files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, in a stable order (the bytes a cold start may read)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def flush(paths: Iterable[Path]) -> None:
    """fsync every file, so that its pages are clean and can be dropped."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def drop(paths: Iterable[Path]) -> None:
    """Ask the kernel to forget the (clean) cached pages of every file."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache now (mincore on a read-only shared mapping; nothing is read)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + PAGE - 1) // PAGE
            vector = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            flags = bytes(vector).translate(_LOW_BIT)
            resident = flags.count(1) * PAGE
            if flags[-1]:  # the last page holds only the file's tail
                resident -= pages * PAGE - size
            return resident
        finally:
            _LIBC.munmap(address, size)
    finally:
        os.close(fd)


def residency(paths: Sequence[Path]) -> dict[str, Any]:
    """Bytes of the files, how many are in the page cache, and the fraction."""
    total = sum(p.stat().st_size for p in paths)
    resident = sum(resident_bytes(p) for p in paths)
    fraction = round(resident / total, 4) if total else 0.0
    return {"bytes": total, "resident_bytes": resident, "resident_fraction": fraction}


def drop_checked(paths: Sequence[Path], limit: float = MAX_RESIDENT_FRACTION) -> dict[str, Any]:
    """Flush, drop, and check: the residency left (raise StillCached when over `limit` after a second try)."""
    for _ in range(2):
        flush(paths)
        drop(paths)
        state = residency(paths)
        if state["resident_fraction"] <= limit:
            return state
    raise StillCached(f"{state['resident_bytes'] / 1e9:.2f} of {state['bytes'] / 1e9:.2f} GB stayed in the page cache "
                      f"after posix_fadvise(DONTNEED) ({state['resident_fraction']:.1%} > {limit:.0%}): another "
                      "process holds the files mapped, or the folder is on a filesystem in memory (tmpfs); put it "
                      "on a disk (--dir or --scratch)")
