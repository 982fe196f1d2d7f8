"""The disk's limit for a cold start: how fast the files of a model folder can be read, with nothing else done.

Why this exists: "the worker is ready in X s" means little until it is set against how fast the same bytes
can come off the same disk in the same run.  `buffered` reads every byte through the page cache (what
safetensors' mmap and plain reads get), into one reused buffer per reader so no memory is allocated,
with 1 reader (file by file, in order) or several (each taking the next 64 MB piece of a file from a
shared list); `direct` reads with O_DIRECT (no page cache: what `dd iflag=direct` measures), for
reference.  The caller drops the page cache before each (pagecache.drop_checked).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path

BLOCK = 16 * 1024 * 1024  # one read call (the buffer each reader reuses)
PIECE = 64 * 1024 * 1024  # the share of a file a parallel reader takes at a time
DIRECT_BLOCK = 4 * 1024 * 1024  # dd bs=4M, as facts.md section 12 measured


def pieces(paths: Sequence[Path], piece: int = PIECE) -> list[tuple[Path, int, int]]:
    """(file, offset, length) pieces covering every byte of `paths`, in file order."""
    out = []
    for path in paths:
        size = path.stat().st_size
        out += [(path, start, min(piece, size - start)) for start in range(0, size, piece)]
    return out


def _read_piece(fd: int, buffer: memoryview, offset: int, length: int) -> int:
    done = 0
    while done < length:
        got = os.preadv(fd, [buffer[:min(len(buffer), length - done)]], offset + done)
        if got == 0:
            break  # the file shrank under us: count what was there
        done += got
    return done


def buffered(paths: Sequence[Path], readers: int = 1) -> tuple[float, int]:
    """(seconds, bytes) to read every file through the page cache with `readers` threads."""
    work: queue.SimpleQueue[tuple[Path, int, int]] = queue.SimpleQueue()
    for item in pieces(paths):
        work.put(item)
    totals = [0] * readers
    errors: list[BaseException] = []

    def reader(index: int) -> None:
        buffer = memoryview(bytearray(BLOCK))
        handles: dict[Path, int] = {}
        try:
            while True:
                try:
                    path, offset, length = work.get_nowait()
                except queue.Empty:
                    return
                if path not in handles:
                    handles[path] = os.open(path, os.O_RDONLY)
                totals[index] += _read_piece(handles[path], buffer, offset, length)
        except BaseException as err:  # re-raised in the caller's thread below
            errors.append(err)
        finally:
            for fd in handles.values():
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(readers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return seconds, sum(totals)


def direct(paths: Sequence[Path]) -> tuple[float, int] | None:
    """(seconds, bytes) with O_DIRECT, one reader, 4 MB aligned reads; None where the filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    buffer = mmap.mmap(-1, DIRECT_BLOCK)  # page-aligned, as O_DIRECT needs
    total = 0
    started = time.perf_counter()
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | flag)
            except OSError:
                return None
            try:
                offset = 0
                while True:
                    got = os.preadv(fd, [buffer], offset)
                    offset += got
                    total += got
                    if got < DIRECT_BLOCK:  # the file's end (a read past it would start unaligned)
                        break
            except OSError:
                return None
            finally:
                os.close(fd)
    finally:
        buffer.close()
    return time.perf_counter() - started, total
