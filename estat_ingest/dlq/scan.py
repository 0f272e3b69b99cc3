"""The DLQ index and the rotating partial scan (docs/dlq.md "Scan").

- `Index`: the files of one sink ordered oldest-first by the unix time in their name (a heap),
  plus the ones currently in flight. Built once at start by a full scan read in chunks of
  DLQ_SCAN_LIMIT entries (each chunk in a thread), then kept up to date by the store's own writes
  and deletions — the process knows every file it writes.
- `Scanner`: a cursor over one directory that survives between passes. Each pass reads the next
  `limit` entries (wrapping around at the end), so a pass costs O(limit) directory entries whatever
  the backlog, and every entry is seen within ceil(entries / limit) passes. It finds what other
  processes left (shared directory, dead instance): unknown data files, stale claims (recovered),
  stale temp files (removed), foreign names (reported once).
- `scan_pass(scanner, limit, known, now, claim_timeout_s)` is the blocking unit of work of one
  pass (the benchmark calls it directly).
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from estat_ingest.dlq import files
from estat_ingest.formats.keys import unix_of_name


@dataclass(frozen=True, slots=True, order=True)
class Entry:
    unix: int  # epoch seconds in the name: the batch's first event → order and TTL
    name: str
    directory: str
    size: int = field(compare=False, default=0)
    mtime: float = field(compare=False, default=0.0)  # wall clock, as the scan found it (0: unknown)
    # when the file came to this disk, on this process's monotonic clock (an estimate for files found
    # by a scan: now minus their mtime's age when first seen). None until the store stamps it
    born: float | None = field(compare=False, default=None)

    @property
    def key(self) -> tuple[str, str]:
        return (self.directory, self.name)


class Index:
    """Oldest-first heap of known files (lazy deletion) + the set of files in flight."""

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._queued: set[tuple[str, str]] = set()
        self._known: dict[tuple[str, str], Entry] = {}
        self._inflight: dict[tuple[str, str], Entry] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def knows(self, directory: str, name: str) -> bool:
        return (directory, name) in self._known

    def get(self, key: tuple[str, str]) -> Entry | None:
        return self._known.get(key)

    def add(self, entry: Entry) -> bool:
        """A file appeared on disk. False if it was already known."""
        if entry.key in self._known:
            return False
        self._known[entry.key] = entry
        self.bytes += entry.size
        self._push(entry)
        return True

    def _push(self, entry: Entry) -> None:
        if entry.key not in self._queued:
            self._queued.add(entry.key)
            heapq.heappush(self._heap, entry)

    def pop(self) -> Entry | None:
        """Take the oldest waiting file (it stays known, now in flight)."""
        while self._heap:
            e = heapq.heappop(self._heap)
            if e.key in self._queued:
                self._queued.discard(e.key)
                if e.key in self._known:
                    self._inflight[e.key] = e
                    return e
        return None

    def peek(self) -> Entry | None:
        while self._heap and self._heap[0].key not in self._queued:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def push_back(self, entry: Entry) -> None:
        """A file taken with pop() goes back to waiting (attempt failed, deferred)."""
        self._inflight.pop(entry.key, None)
        if entry.key in self._known:
            self._push(self._known[entry.key])

    def drop(self, entry: Entry) -> int:
        """The file left the directory; returns its size (0 if it was not known)."""
        self._inflight.pop(entry.key, None)
        self._queued.discard(entry.key)
        known = self._known.pop(entry.key, None)
        if known is None:
            return 0
        self.bytes -= known.size
        return known.size

    def oldest_unix(self) -> int | None:
        top = self.peek()
        candidates = [e.unix for e in self._inflight.values()]
        if top is not None:
            candidates.append(top.unix)
        return min(candidates) if candidates else None

    def waiting(self) -> int:
        return len(self._queued)

    def in_flight(self, key: tuple[str, str]) -> bool:
        return key in self._inflight

    def entries_in(self, directory: str) -> list[Entry]:
        """Every known file of `directory` (O(files): once per sweep of a directory, not per pass)."""
        return [e for e in self._known.values() if e.directory == directory]


class Scanner:
    """A directory cursor that survives between passes (blocking; use from one thread at a time)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._it: object | None = None  # os.scandir iterator
        self.wraps = 0  # completed sweeps of the whole directory
        self.missing = False  # the directory was not there at the last read

    def read(self, limit: int) -> list[os.DirEntry[str]]:
        out: list[os.DirEntry[str]] = []
        reopened = False
        while len(out) < limit:
            if self._it is None:
                if reopened:
                    break  # the whole directory is smaller than `limit`
                try:
                    self._it = os.scandir(self.directory)
                except FileNotFoundError:
                    self.missing = True
                    break
                self.missing = False
                reopened = True
            entry = next(self._it, None)  # type: ignore[call-overload]
            if entry is None:
                self.close()
                self.wraps += 1
                continue
            out.append(entry)
        return out

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None


@dataclass(slots=True)
class ScanResult:
    new: list[Entry] = field(default_factory=list)  # data files not known yet
    recovered: list[str] = field(default_factory=list)  # stale claims renamed back (names)
    temps_removed: int = 0
    foreign: list[str] = field(default_factory=list)
    metas: list[str] = field(default_factory=list)  # meta names seen at start (orphan checks)
    present: set[str] = field(default_factory=set)  # data names and names under a claim
    entries: int = 0


def scan_pass(scanner: Scanner, limit: int, known: Callable[[str, str], bool], now: float,
              claim_timeout_s: float, starting: bool = False,
              owner_dead: Callable[[str], bool] | None = None) -> ScanResult:
    """Read the next `limit` entries of the scanner's directory and act on them (blocking).

    A claim is stale after `claim_timeout_s`, or at once when `owner_dead` says its owner's lease
    shows it dead (durable mode: spool/lease.py).

    Cost: one readdir chunk + one stat per data file not in the index (+ renames/unlinks for stale
    claims and temp files). Whatever the number of files in the directory.
    """
    res = ScanResult()
    d = scanner.directory
    for entry in scanner.read(limit):
        res.entries += 1
        name = entry.name
        kind = files.kind_of(name)
        try:
            if not entry.is_file(follow_symlinks=False):
                continue  # sink subdirectories, rejected/, corrupt/, worker roots
            if kind == "data":
                res.present.add(name)
                if not known(d, name):
                    st = entry.stat(follow_symlinks=False)
                    res.new.append(Entry(unix_of_name(name) or 0, name, d, st.st_size, st.st_mtime))
            elif kind == "claim":
                m = files.CLAIM_RE.match(name)
                if m is not None:
                    res.present.add(m.group("name"))
                data_name = files.stale_claim(name, now, claim_timeout_s)
                if data_name is None and m is not None and owner_dead is not None and owner_dead(m.group("owner")):
                    data_name = m.group("name")
                if data_name is not None and files.recover(d, name, data_name):
                    res.recovered.append(data_name)
                    if not known(d, data_name):
                        with contextlib.suppress(FileNotFoundError):
                            st = os.stat(os.path.join(d, data_name))
                            res.new.append(Entry(unix_of_name(data_name) or 0, data_name, d, st.st_size, st.st_mtime))
            elif kind == "temp":
                age = now - entry.stat(follow_symlinks=False).st_mtime
                if files.temp_is_stale(name, age, starting, claim_timeout_s):
                    os.unlink(entry.path)
                    res.temps_removed += 1
            elif kind == "meta":
                if starting:  # orphan candidates; stat()ed later only if their data file is missing
                    res.metas.append(name)
            else:
                res.foreign.append(name)
        except FileNotFoundError:
            continue  # taken or deleted by another process meanwhile
    return res


def remove_orphan_metas(directory: str, metas: list[str], present: set[str], now: float, min_age_s: float) -> int:
    """After a full sweep at start: meta files whose data file is gone for good (a crash between the
    two unlinks of a delivery). Old enough that no live writer or replayer can be using them."""
    n = 0
    for meta_name in metas:
        data_name = meta_name[: -len(files.META_SUFFIX)]
        if data_name in present:
            continue
        path = os.path.join(directory, meta_name)
        try:
            if now - os.stat(path).st_mtime <= min_age_s or os.path.exists(os.path.join(directory, data_name)):
                continue
            os.unlink(path)
            n += 1
        except FileNotFoundError:
            continue
    return n
