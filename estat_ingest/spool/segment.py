"""One spool file on disk (blocking: called from the committer's threads and from recovery).

Layout: `<partition with "/" as "+">+<name>`, e.g. `dt=2026-12-01+hr=17+1796115374_host-ab12cd_000001.jsonl.gz`.
Content: complete gzip members (zstd frames), one per group commit, appended at the committed
offset; the file never holds anything but members, except a torn tail after a crash.
"""

from __future__ import annotations

import contextlib
import os

from estat_ingest.formats.codec import Members, compress, walk_members
from estat_ingest.formats.keys import parse_spool_name, spool_name
from estat_ingest.fsutil import fsync_dir

__all__ = ["Members", "SpoolFile", "cut", "parse_spool_name", "read", "spool_name", "walk_members"]


class SpoolFile:
    """An open batch's file. `append` makes one group durable; `committed` is its durable length
    (members only: after a failed append `rollback` cuts the file back to it)."""

    __slots__ = ("committed", "compression", "fd", "level", "path")

    def __init__(self, path: str, compression: str, level: int) -> None:
        self.path = path
        self.compression = compression
        self.level = level
        self.fd: int | None = None
        self.committed = 0

    def append(self, lines: list[bytes]) -> tuple[bytes, int]:
        """Compress `lines` as one member, write it after the committed bytes and fdatasync it;
        the member and the new durable length (the caller sets `committed` once its whole round
        succeeded). On the first append the file is created and its directory fsynced."""
        member = compress(b"".join(lines), self.compression, self.level)
        first = self.fd is None
        if first:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fd = self.fd
        assert fd is not None
        view = memoryview(member)
        off = self.committed
        while view:
            n = os.pwrite(fd, view, off)
            view = view[n:]
            off += n
        os.fdatasync(fd)
        if first:
            fsync_dir(os.path.dirname(self.path))
        return member, off

    def rollback(self) -> None:
        """After a failed append: cut whatever part of it reached the file (best effort)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.committed)
                os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def cut(path: str, length: int) -> None:
    """Truncate a recovered file to its complete members, durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)
