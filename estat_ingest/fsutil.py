"""Durable file writes (blocking: call through asyncio.to_thread)."""

from __future__ import annotations

import contextlib
import os


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(path: str, data: bytes) -> str:
    """Write `data` to a hidden temp file beside `path`, fsynced; return the temp path."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}-{os.urandom(3).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def atomic_write(path: str, data: bytes) -> None:
    """temp file + fsync + rename + directory fsync: the file is complete or absent."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = write_tmp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(directory)
