"""DLQ store: one directory per sink under DLQ_DIR (docs/dlq.md).

Invariants
- A DLQ entry is the v1 pair `<name>` (the encoded batch, byte-identical to what the sink would
  receive) + `<name>.meta.json` (`num_events` and, new, sink, key, partition, first_ts, created_at,
  compression, checksum, attempts, reason).
- Files are written to a hidden temp name, fsynced, renamed (data first, then meta), and the
  directory is fsynced: after a crash an entry is complete or absent (a data file whose meta rename
  did not happen is complete: it replays like a v1 file). Temp files left by a crash are removed.
- Nothing is deleted without delivery except by a counted, logged policy: ttl, capacity (only with
  DLQ_WHEN_FULL=drop_oldest), corrupt (quarantined) — each adds the file's events to
  dlq_events_dropped_total{reason}.
- The DLQ fails closed: `put` either writes a batch durably or says why it could not (full, too
  large, no space, read-only, no permission, I/O error) and drops nothing; the caller keeps the
  batch (the engine holds it in memory and /collect answers 503 once that fills the budget).
  With DLQ_WHEN_FULL=reject (the default) a full DLQ refuses new batches; with drop_oldest it
  evicts the oldest files to make room, counted as `capacity`.
- The index (scan.Index) knows every file this process wrote plus what the start-up scan and the
  rotating partial scans found; the gauges are computed from it, so they are exact after restarts.
  With `serve --workers N` each directory under DLQ_DIR belongs to one worker's index (its own
  root, and the roots no running worker owns shared out by `sibling_dirs`), so the gauges summed
  over the group count every file once.
- TTL trusts no single clock: a file expires only when both its name's time (its first event) and
  the time it has spent on this disk exceed DLQ_MAX_AGE. The disk time is measured on the monotonic
  clock from when this process first saw the file (plus, for a file found by a scan, its mtime's age
  at that moment), so a wall-clock jump while running expires nothing. A start-up that would expire
  more than a small share of the backlog at once (a jump before the start) expires nothing for one
  DLQ_MAX_AGE of monotonic time, with a warning.
- Before a file is read for delivery or deleted by policy it is claimed (files.claim), so several
  processes can share one directory.
- The gauges follow the disk: a file the index knows that a whole sweep of its directory did not
  meet (and that is not there when checked) has left without this process — deleted by hand, or
  taken by another process sharing the directory — and a source directory that disappeared lost
  every file it held; both leave the index at once and are counted in dlq_files_lost_total{reason}.
- All file work is blocking and runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import orjson

from estat_ingest.dlq import files
from estat_ingest.dlq.files import META_SUFFIX
from estat_ingest.dlq.scan import Entry, Index, Scanner, ScanResult, remove_orphan_metas, scan_pass
from estat_ingest.formats.codec import checksum
from estat_ingest.formats.keys import unix_of_name
from estat_ingest.fsutil import fsync_dir, write_tmp
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import Payload

if TYPE_CHECKING:
    from estat_ingest.config import Settings

log = logging.getLogger("estat_ingest.dlq")

__all__ = ["META_SUFFIX", "DirTotals", "DlqStore", "is_data_name"]


def is_data_name(name: str) -> bool:
    return files.kind_of(name) == "data"


@dataclass(slots=True)
class DirTotals:
    files: int = 0
    bytes: int = 0


MIN_FREE_SHARE = 0.05  # the default free-space margin is at most this share of the DLQ's volume
# a start-up scan that finds more than this share of the backlog past DLQ_MAX_AGE holds the TTL for
# one DLQ_MAX_AGE of monotonic time: more likely a clock that jumped than a backlog that aged
START_EXPIRE_SHARE = 0.1
LOG_EVERY_S = 10.0  # one refusal line per reason per this many seconds

# why `put` did not write a batch (a bounded label; nothing is dropped for any of them)
FULL, TOO_LARGE = "full", "too_large"


def refusal_of(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no_space"
    if err.errno == errno.EROFS:
        return "read_only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission"
    return "io_error"


@dataclass(frozen=True, slots=True)
class Limits:
    max_age_s: float = 24 * 3600.0  # 0 = never expire
    max_size_bytes: int = 0  # 0 = no cap
    min_free_bytes: int = 0
    scan_limit: int = 1000
    claim_timeout_s: float = 300.0
    # how long start() may scan before it returns and the replayer finishes the scan in the
    # background (a big backlog on slow storage such as EFS must not delay /ready); None = all
    start_scan_budget_s: float | None = None
    min_free_auto: bool = False  # min_free_bytes is only an upper bound: at most MIN_FREE_SHARE of the volume
    when_full: str = "reject"  # reject (refuse new batches) or drop_oldest (evict the oldest files)

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(s.dlq_max_age_s, s.dlq_max_size_bytes, s.dlq_min_free_bytes, s.dlq_scan_limit,
                   s.dlq_claim_timeout_s, start_scan_budget_s=1.0, min_free_auto=s.dlq_min_free_auto,
                   when_full=s.dlq_when_full)


@dataclass(slots=True)
class _Seen:
    """What the rotating scan met during the current sweep of one directory."""

    wraps: int  # the scanner's sweep count when this sweep began
    started: float  # monotonic time it began: files this process added later are not judged by it
    names: set[str] = field(default_factory=set)  # data names met (also under a claim)


@dataclass(slots=True)
class _Sweep:
    scanner: Scanner
    start_wraps: int
    metas: list[str] = field(default_factory=list)
    present: set[str] = field(default_factory=set)


def worker_root_index(name: str) -> int | None:
    """<i> of a worker root's name `w<i>`, else None."""
    return int(name[1:]) if name.startswith("w") and name[1:].isdigit() else None


def sibling_dirs(top: str, sink: str, own: str, slot: tuple[int, int] | None = None) -> list[str]:
    """The same sink's directory under DLQ_DIR and under every worker root `DLQ_DIR/w<j>/`.

    For worker i of `serve --workers N` (`slot` = (i, N)) only the directories no running worker
    owns, each to exactly one worker: `DLQ_DIR/<sink>` to worker 0, `w<j>/<sink>` for j ≥ N (a run
    with more workers) to worker j mod N. Every file of the group is then indexed — replayed and
    counted in the dlq_* gauges — by one worker only, so the group's sums are true."""
    out = [os.path.join(top, sink)] if slot is None or slot[0] == 0 else []
    with contextlib.suppress(FileNotFoundError), os.scandir(top) as it:
        for e in it:
            j = worker_root_index(e.name)
            if j is None or not e.is_dir(follow_symlinks=False):
                continue
            if slot is None or (j >= slot[1] and j % slot[1] == slot[0]):
                out.append(os.path.join(top, e.name, sink))
    return sorted(d for d in out if os.path.abspath(d) != os.path.abspath(own) and os.path.isdir(d))


def _not_on_disk(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if not os.path.exists(os.path.join(e.directory, e.name))]


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def volume_bytes(path: str) -> tuple[int, int]:
    """(size, free) of the file system that holds `path`, in bytes (as an unprivileged writer sees it)."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


class DlqStore:
    def __init__(self, root: str, sink: str, metrics: Metrics, *, settings: Settings | None = None,
                 limits: Limits | None = None, reads_v1: bool = False, owner: str | None = None,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.wall = wall  # the clocks (injectable: tests jump them)
        self.mono = mono
        self.sink = sink
        self.dir = os.path.join(root, sink)
        self.metrics = metrics
        self.totals = DirTotals()
        self.limits = limits or (Limits.of(settings) if settings is not None else Limits())
        self.owner = owner or files.owner_id(settings.instance_id if settings is not None else "estat")
        # blocking; True when a claim's owner is known dead (its lease says so): recover it at once
        self.owner_dead: Callable[[str], bool] | None = None
        # DLQ_DIR itself when `root` is DLQ_DIR or a worker root in it (an unrelated root, as in
        # tests, never reaches into the configured DLQ_DIR)
        top = None
        self._slot: tuple[int, int] | None = None  # (i, N): worker i of serve --workers N
        if settings is not None:
            r, t = os.path.abspath(root), os.path.abspath(settings.dlq_dir)
            top = t if r == t or os.path.dirname(r) == t else None
            index = worker_root_index(os.path.basename(r)) if top is not None and r != t else None
            if index is not None and settings.workers > 1:
                self._slot = (index, settings.workers)
        # v1 pairs lie directly in DLQ_DIR; only the sink whose spec says so (s3) replays them (with
        # workers, worker 0: one reader per directory, see sibling_dirs)
        top_v1 = [top] if top and (self._slot is None or self._slot[0] == 0) else []
        v1_dirs = tuple(dict.fromkeys([root, *top_v1])) if reads_v1 else ()
        self.sources: tuple[str, ...] = (self.dir, *v1_dirs)
        self._top = top
        self.index = Index()
        self.changed = asyncio.Event()  # set when a file is written (wakes the replayer)
        self._scanners = [Scanner(d) for d in self.sources]
        self._reported_foreign: set[tuple[str, str]] = set()
        self._lock = asyncio.Lock()
        self._sweeps: list[_Sweep] = []  # start-up sweeps not finished yet
        self.indexed = asyncio.Event()  # set once every source directory has been read in full
        self.min_free_bytes = self.limits.min_free_bytes  # the effective margin (auto: set by start())
        self.dropped_events = 0  # events this process deleted by policy (ttl, capacity, corrupt)
        self._refusal_logged: dict[str, float] = {}
        self._refusals_suppressed = 0
        self._start_expired = 0  # files of the start-up scan already past DLQ_MAX_AGE by both clocks
        self._seen: dict[str, _Seen] = {}  # per source directory
        self._scan_errors_logged: dict[str, float] = {}
        self.ttl_hold_until: float | None = None  # monotonic: no TTL expiry before this (see START_EXPIRE_SHARE)

    # ---------------------------------------------------------------- start-up

    async def start(self) -> None:
        """Create the directory, clean crash leftovers, build the index by a full scan in chunks."""
        await asyncio.to_thread(os.makedirs, self.dir, exist_ok=True)
        if self._top is not None:
            siblings = await asyncio.to_thread(sibling_dirs, self._top, self.sink, self.dir, self._slot)
            new = [d for d in siblings if d not in self.sources]
            if new:  # e.g. `serve` after `serve --workers 4`: the other roots' files are not orphaned
                self.sources = (*self.sources, *new)
                self._scanners += [Scanner(d) for d in new]
                log.info("dlq also replays sibling directories", extra={"sink": self.sink, "dirs": new})
        self._sweeps = [_Sweep(sc, sc.wraps) for sc in self._scanners]
        loop = asyncio.get_running_loop()
        budget = self.limits.start_scan_budget_s
        await self.finish_start(None if budget is None else loop.time() + budget)
        if not self.indexed.is_set():
            log.info("dlq start-up scan continues in the background", extra={
                "sink": self.sink, "files_so_far": self.totals.files})
        await self._log_capacity()

    async def _log_capacity(self) -> None:
        """The effective free-space margin, and one line saying how much this DLQ may hold."""
        lim = self.limits
        try:
            size, free = await asyncio.to_thread(volume_bytes, self.dir)
        except OSError as err:
            log.warning("dlq volume cannot be measured", extra={"sink": self.sink, "dir": self.dir,
                                                                 "error": str(err)})
            return
        if lim.min_free_auto:
            self.min_free_bytes = min(lim.min_free_bytes, int(size * MIN_FREE_SHARE))
        may_hold = max(0, free - self.min_free_bytes)
        if lim.max_size_bytes > 0:
            may_hold = min(may_hold, max(0, lim.max_size_bytes - self.totals.bytes))
        extra = {"sink": self.sink, "dir": self.dir, "volume_bytes": size, "free_bytes": free,
                 "min_free_bytes": self.min_free_bytes, "max_size_bytes": lim.max_size_bytes,
                 "holds_bytes": self.totals.bytes, "may_hold_bytes": may_hold, "when_full": lim.when_full}
        if self.min_free_bytes >= size > 0:
            log.warning("dlq can hold nothing: DLQ_MIN_FREE_BYTES is not below the size of its volume", extra=extra)
        else:
            log.info("dlq capacity", extra=extra)

    async def finish_start(self, deadline: float | None = None) -> bool:
        """Read the source directories in full (chunks in a thread), until done or `deadline`
        (loop time). True when the index holds everything that was on disk at start."""
        lim = self.limits
        chunk = max(1000, lim.scan_limit)
        loop = asyncio.get_running_loop()
        while self._sweeps:
            sw = self._sweeps[0]
            while sw.scanner.wraps == sw.start_wraps:
                if deadline is not None and loop.time() > deadline:
                    self.publish()
                    return False
                res = await asyncio.to_thread(scan_pass, sw.scanner, chunk, self.index.knows, self.wall(),
                                              lim.claim_timeout_s, True, self.owner_dead)
                self._absorb(res)
                sw.metas.extend(res.metas)
                sw.present |= res.present
                if res.entries == 0:
                    break
            if sw.metas:
                await asyncio.to_thread(remove_orphan_metas, sw.scanner.directory, sw.metas, sw.present,
                                        self.wall(), lim.claim_timeout_s)
            self._sweeps.pop(0)
        self.publish()
        if not self.indexed.is_set():
            self.indexed.set()
            if self.totals.files:
                log.info("dlq found at start", extra={"sink": self.sink, "files": self.totals.files,
                                                      "bytes": self.totals.bytes})
            self._hold_ttl_after_start()
            for sc in self._scanners:  # the first sweep after start already tells what left the disk
                self._seen[sc.directory] = _Seen(sc.wraps, self.mono())
        return True

    def _hold_ttl_after_start(self) -> None:
        ttl = self.limits.max_age_s
        if ttl <= 0 or self._start_expired <= max(1, self.totals.files * START_EXPIRE_SHARE):
            return
        self.ttl_hold_until = self.mono() + ttl
        log.warning("dlq: most of the backlog found at start is past DLQ_MAX_AGE; the clock may have jumped, "
                    "so nothing expires for one DLQ_MAX_AGE of monotonic time", extra={
                        "sink": self.sink, "files": self.totals.files, "expired": self._start_expired,
                        "max_age_s": ttl})

    def _ttl_held(self, mono: float) -> bool:
        if self.ttl_hold_until is None:
            return False
        if mono < self.ttl_hold_until:
            return True
        self.ttl_hold_until = None
        log.warning("dlq: the start-up TTL hold is over; files past DLQ_MAX_AGE by both clocks expire now",
                    extra={"sink": self.sink})
        return False

    def stamp(self, e: Entry) -> Entry:
        """`e` with `born` set: when it came to this disk on the monotonic clock (from its mtime's age
        now, or now when the mtime is unknown or in the future)."""
        if e.born is not None:
            return e
        mono = self.mono()
        age = max(0.0, self.wall() - e.mtime) if e.mtime else 0.0
        return replace(e, born=mono - age)

    def expired(self, e: Entry, wall: float, mono: float) -> bool:
        """Past DLQ_MAX_AGE by the time in its name AND by its time on this disk."""
        ttl = self.limits.max_age_s
        return ttl > 0 and wall - e.unix > ttl and mono - (mono if e.born is None else e.born) > ttl

    def _absorb(self, res: ScanResult) -> None:
        starting = not self.indexed.is_set()
        wall, mono = self.wall(), self.mono()
        for e in res.new:
            e = self.stamp(e)
            if self.index.add(e):
                self._start_expired += starting and self.expired(e, wall, mono)
                self.totals.files += 1
                self.totals.bytes += e.size
        for name in res.foreign:
            key = (self.sink, name)
            if key not in self._reported_foreign and len(self._reported_foreign) < 10_000:
                self._reported_foreign.add(key)
                log.warning("foreign file in the dlq directory ignored", extra={"sink": self.sink,
                                                                                "file": name})
        if res.recovered:
            log.warning("stale dlq claims recovered", extra={"sink": self.sink, "files": len(res.recovered)})

    def publish(self) -> None:
        """Set the gauges from the index (exact after a restart, a scan pass, a write)."""
        self.metrics.dlq_files.labels(self.sink).set(self.totals.files)
        self.metrics.dlq_bytes.labels(self.sink).set(self.totals.bytes)
        oldest = self.index.oldest_unix()
        self.metrics.dlq_oldest_age.labels(self.sink).set(0 if oldest is None else max(0.0, self.wall() - oldest))

    # ---------------------------------------------------------------- write side

    def meta_of(self, payload: Payload, reason: str) -> dict[str, object]:
        meta: dict[str, object] = {
            "num_events": payload.num_events,
            "sink": self.sink,
            "key": f"{payload.partition}/{payload.name}",
            "partition": payload.partition,
            "first_ts": payload.first_ts,
            "created_at": self.wall(),
            "compression": payload.compression,
            "checksum": checksum(payload.data),
            "attempts": payload.attempts,
            "reason": reason,
        }
        meta.update(payload.meta)
        return meta

    def write_sync(self, payload: Payload, reason: str, directory: str | None = None) -> None:
        """Write one entry durably, or raise and leave nothing of it behind (no temp, no half pair)."""
        d = directory or self.dir
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, payload.name)
        meta = orjson.dumps(self.meta_of(payload, reason))
        if payload.file is not None and files.take(payload.file, path, meta):
            return  # a spool file, renamed in: its bytes are written once
        temps: list[str] = []
        try:
            temps.append(write_tmp(path, payload.data))
            temps.append(write_tmp(path + META_SUFFIX, meta))
            os.replace(temps[0], path)
            try:
                os.replace(temps[1], path + META_SUFFIX)
            except BaseException:
                os.unlink(path)  # the caller keeps the batch: no half entry stays behind
                raise
        except BaseException:
            for t in temps:
                with contextlib.suppress(OSError):
                    os.unlink(t)
            raise
        # a failed directory fsync leaves a complete entry that may not survive a power cut: the caller
        # keeps the batch too, and a second copy under the same name and key is harmless
        fsync_dir(d)

    async def put(self, payload: Payload, reason: str) -> str | None:
        """Persist an undeliverable payload. None once it is on disk; otherwise why the DLQ refused
        it (`full`, `too_large`, `no_space`, `read_only`, `permission`, `io_error`): nothing is
        dropped, the caller keeps the batch and offers it again later."""
        size = len(payload.data)
        refusal = await self.make_room(size)
        error = ""
        if refusal is None:
            try:
                await asyncio.to_thread(self.write_sync, payload, reason)
            except OSError as err:
                self.metrics.dlq_write_errors.labels(self.sink).inc()
                refusal, error = refusal_of(err), str(err)
        if refusal is not None:
            self._refused(payload, refusal, error)
            return refusal
        self.added(Entry(unix_of_name(payload.name) or int(payload.first_ts), payload.name, self.dir, size,
                         self.wall(), self.mono()))
        self.metrics.dlq_enqueued.labels(self.sink).inc(payload.num_events)
        self.metrics.dlq_writes.labels(self.sink, reason).inc()
        log.warning("batch written to dlq", extra={
            "sink": self.sink, "file": payload.name, "events": payload.num_events,
            "bytes": size, "reason": reason})
        return None

    def _refused(self, payload: Payload, refusal: str, error: str) -> None:
        now = time.monotonic()
        last = self._refusal_logged.get(refusal)
        if last is not None and now - last < LOG_EVERY_S:
            self._refusals_suppressed += 1
            return
        self._refusal_logged[refusal] = now
        extra: dict[str, object] = {
            "sink": self.sink, "file": payload.name, "events": payload.num_events, "bytes": len(payload.data),
            "reason": refusal, "when_full": self.limits.when_full, "dlq_bytes": self.totals.bytes,
            "suppressed": self._refusals_suppressed}
        if error:
            extra["error"] = error
        self._refusals_suppressed = 0
        log.error("dlq refused a batch: it is kept in memory, not dropped", extra=extra)

    def added(self, entry: Entry) -> None:
        """A file this process put on disk (its time on this disk starts now unless `entry` says)."""
        if self.index.add(self.stamp(entry)):
            self.totals.files += 1
            self.totals.bytes += entry.size
            self.publish()
        self.changed.set()

    def forget(self, size: int) -> None:
        """A data file of `size` bytes left the directory (delivered, expired, evicted)."""
        self.totals.files = max(0, self.totals.files - 1)
        self.totals.bytes = max(0, self.totals.bytes - size)
        self.publish()

    def gone(self, entry: Entry) -> None:
        """The file left the directory (delivered here, or taken by another process)."""
        if self.index.knows(entry.directory, entry.name):
            self.forget(self.index.drop(entry))

    async def consume(self, entry: Entry, cpath: str) -> None:
        """Delete a claimed file that was delivered (or stored elsewhere for good)."""
        if await asyncio.to_thread(files.remove, cpath, entry.directory, entry.name):
            self.gone(entry)
        else:  # our claim was recovered by another process while we were slow: it is back on disk
            self.index.push_back(entry)

    async def rewrite(self, entry: Entry, cpath: str, remainder: Payload) -> None:
        """Replace a claimed file by what is left of it after a partial delivery (same name)."""
        def write() -> None:
            self.write_sync(replace(remainder, name=entry.name), "partial", directory=entry.directory)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cpath)

        await asyncio.to_thread(write)
        known = self.index.get(entry.key) or entry  # the same file for the TTL: its time here goes on
        self.gone(entry)
        self.added(Entry(entry.unix, entry.name, entry.directory, len(remainder.data), known.mtime, known.born))

    # ---------------------------------------------------------------- scan and policy

    async def rescan(self) -> int:
        """One rotating partial scan: DLQ_SCAN_LIMIT entries of each source directory; at the end of
        a whole sweep (or when a directory is gone) the index gives up what is no longer on disk."""
        n = 0
        for scanner in self._scanners:
            try:
                res = await asyncio.to_thread(scan_pass, scanner, self.limits.scan_limit, self.index.knows,
                                              self.wall(), self.limits.claim_timeout_s, False, self.owner_dead)
            except OSError as err:  # e.g. EACCES on the directory: the next pass tries again
                self._scan_failed(scanner.directory, err)
                continue
            self._absorb(res)
            n += len(res.new)
            await self._follow_disk(scanner, res)
        self.publish()
        return n

    async def _follow_disk(self, scanner: Scanner, res: ScanResult) -> None:
        d, mono = scanner.directory, self.mono()
        if scanner.missing:
            self._seen.pop(d, None)
            lost = self.index.entries_in(d)
            if lost:
                self._lost(lost, "directory_gone")
                log.error("dlq directory disappeared: the files it held are lost", extra={
                    "sink": self.sink, "dir": d, "files": len(lost), "bytes": sum(e.size for e in lost)})
            if d == self.dir:  # new batches can be written again; the next pass reads it afresh
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(os.makedirs, d, exist_ok=True)
            return
        seen = self._seen.get(d)
        if seen is None:
            self._seen[d] = _Seen(scanner.wraps, mono, set(res.present))
            return
        seen.names |= res.present
        if scanner.wraps == seen.wraps:
            return
        # a whole sweep ended in this pass: what the index knew before it and the sweep never met is
        # checked on disk once; the next sweep starts with this pass's names
        self._seen[d] = _Seen(scanner.wraps, mono, set(res.present))
        candidates = [e for e in self.index.entries_in(d) if e.name not in seen.names
                      and not self.index.in_flight(e.key) and e.born is not None and e.born < seen.started]
        if not candidates:
            return
        gone = await asyncio.to_thread(_not_on_disk, candidates)
        gone = [e for e in gone if self.index.knows(e.directory, e.name) and not self.index.in_flight(e.key)]
        if gone:
            self._lost(gone, "vanished")
            log.warning("dlq files left the directory without this process (deleted by hand, or taken by "
                        "another process sharing it)", extra={
                            "sink": self.sink, "dir": d, "files": len(gone), "bytes": sum(e.size for e in gone),
                            "examples": [e.name for e in gone[:5]]})

    def _lost(self, entries: list[Entry], reason: str) -> None:
        for e in entries:
            size = self.index.drop(e)
            self.totals.files = max(0, self.totals.files - 1)
            self.totals.bytes = max(0, self.totals.bytes - size)
        self.metrics.dlq_lost.labels(self.sink, reason).inc(len(entries))
        self.publish()

    def _scan_failed(self, directory: str, err: OSError) -> None:
        now = time.monotonic()
        last = self._scan_errors_logged.get(directory)
        if last is None or now - last >= LOG_EVERY_S:
            self._scan_errors_logged[directory] = now
            log.error("dlq directory cannot be read", extra={"sink": self.sink, "dir": directory,
                                                             "error": str(err)})

    async def enforce(self, now: float | None = None) -> int:
        """TTL on the oldest files, then (drop_oldest) the size cap. Returns files dropped.

        TTL looks at the files whose name is past DLQ_MAX_AGE, oldest first, at most DLQ_SCAN_LIMIT
        per pass, and drops those whose time on this disk is past it too (`expired`)."""
        now = self.wall() if now is None else now
        mono = self.mono()
        ttl = self.limits.max_age_s
        dropped = 0
        if ttl > 0 and not self._ttl_held(mono):
            young: list[Entry] = []  # old by name, not by their time here: they stay
            try:
                while (len(young) < self.limits.scan_limit and (top := self.index.peek()) is not None
                       and now - top.unix > ttl):
                    e = self.index.pop()
                    assert e is not None
                    if self.expired(e, now, mono):
                        dropped += await self.drop(e, "ttl")
                    else:
                        young.append(e)
            finally:
                for e in young:
                    self.index.push_back(e)
        # drop_oldest: the size cap every pass; the free-disk margin only when we are about to write (the
        # disk may be filled by something else: evicting the whole DLQ for it without a write gains nothing)
        if self.limits.when_full == "drop_oldest":
            await self.make_room(0, check_free=False)
        return dropped

    async def make_room(self, size: int, check_free: bool = True) -> str | None:
        """None when `size` more bytes fit under DLQ_MAX_SIZE_BYTES and above the free-space margin,
        else `full` (or `too_large`: more than the cap on its own). With DLQ_WHEN_FULL=drop_oldest
        the oldest files are evicted first (counted as `capacity`) until they fit."""
        lim = self.limits
        if lim.max_size_bytes > 0 and size > lim.max_size_bytes:
            return TOO_LARGE  # can never fit: evicting older files would lose them for nothing
        evict = lim.when_full == "drop_oldest"
        async with self._lock:
            while True:
                over_cap = lim.max_size_bytes > 0 and self.totals.bytes + size > lim.max_size_bytes
                low_disk = False
                if not over_cap and check_free and self.min_free_bytes > 0:
                    try:
                        low_disk = await asyncio.to_thread(free_bytes, self.dir) - size < self.min_free_bytes
                    except OSError:
                        low_disk = False
                if not (over_cap or low_disk):
                    return None
                if not evict:
                    return FULL
                e = self.index.pop()
                if e is None:
                    return FULL if over_cap else None  # low disk with nothing to evict: try the write
                await self.drop(e, "capacity")

    async def drop(self, entry: Entry, reason: str) -> int:
        """Delete a file by policy (claimed first), counting its events. Returns 1 if deleted."""
        try:
            cpath = await asyncio.to_thread(files.claim, entry.directory, entry.name, self.owner)
        except OSError as err:  # read-only, no permission: it stays, and is tried again next pass
            log.error("dlq file could not be claimed for deletion", extra={
                "sink": self.sink, "file": entry.name, "reason": reason, "error": str(err)})
            self.index.push_back(entry)
            return 0
        if cpath is None:  # another process has it: not ours to count
            self.gone(entry)
            return 0
        try:
            n, ok = await asyncio.to_thread(self._drop_sync, cpath, entry)
        except OSError as err:
            log.error("dlq file could not be deleted", extra={"sink": self.sink, "file": entry.name,
                                                              "reason": reason, "error": str(err)})
            await asyncio.to_thread(files.release, cpath, entry.directory, entry.name)
            self.index.push_back(entry)
            return 0
        self.gone(entry)
        if not ok:
            return 0
        self._count_drop(entry.name, n, reason)
        self.metrics.dlq_expired.labels(self.sink).inc()
        return 1

    def _drop_sync(self, cpath: str, entry: Entry) -> tuple[int, bool]:
        meta = files.read_meta(entry.directory, entry.name)
        n = files.events_for_drop(cpath, entry.name, meta)
        return n, files.remove(cpath, entry.directory, entry.name)

    def _count_drop(self, name: str, events: int, reason: str) -> None:
        self.dropped_events += events
        self.metrics.dlq_dropped.labels(self.sink, reason).inc(events)
        log.error("dlq events dropped", extra={"sink": self.sink, "file": name, "events": events,
                                               "reason": reason})

    async def quarantine(self, entry: Entry, cpath: str, error: str) -> None:
        """A corrupt file: moved to `<dir>/corrupt/` (kept for inspection), its events counted."""
        def move() -> int:
            meta = files.read_meta(entry.directory, entry.name)
            n = files.events_of(meta) or 0
            files.move_aside(cpath, entry.directory, entry.name, files.CORRUPT)
            return n

        n = await asyncio.to_thread(move)
        self.gone(entry)
        self.dropped_events += n
        self.metrics.dlq_dropped.labels(self.sink, "corrupt").inc(n)
        log.error("corrupt dlq file quarantined", extra={
            "sink": self.sink, "file": entry.name, "events": n, "reason": "corrupt", "error": error,
            "moved_to": os.path.join(entry.directory, files.CORRUPT)})
