"""The spool writer: group commit of every lane's open batches, and the leases around it.

The engine's dispatcher adds records to its batchers as in memory mode and then tells the spool
which batches have new records (`note`) and which requests are answered by them (`add_tickets`).
The committer task writes one member per dirty batch per round, in threads, and answers the
round's tickets only after every file of the round was fdatasynced and the lease was still held.
A closed batch is `seal`ed: its payload is the concatenation of its members, ready once its last
records are durable (no compression at close: the members are the batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from estat_ingest.dlq.scan import Entry
from estat_ingest.dlq.store import DlqStore
from estat_ingest.formats.keys import unix_of_name
from estat_ingest.metrics import Metrics
from estat_ingest.spool import lease
from estat_ingest.spool.recover import recover_owner
from estat_ingest.spool.segment import SpoolFile, spool_name

if TYPE_CHECKING:
    from estat_ingest.pipeline.batcher import Batch

log = logging.getLogger("estat_ingest.spool")

RETRY_AFTER_S = 1


class SpoolError(Exception):
    """The spool could not make a request's events durable: answer 503, never 2xx."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # bounded: no_space, read_only, permission, io_error, lease_lost


def reason_of(err: OSError) -> str:
    return {errno.ENOSPC: "no_space", errno.EDQUOT: "no_space", errno.EROFS: "read_only",
            errno.EACCES: "permission", errno.EPERM: "permission"}.get(err.errno or 0, "io_error")


@dataclass(slots=True, eq=False)
class Spooled:
    """One batch's durable state: its fixed name and partition, its file, its members so far."""

    sink: str
    name: str
    partition: str
    batch: Batch
    file: SpoolFile
    members: list[bytes] = field(default_factory=list)
    committed: int = 0  # records of `batch.lines` that are durable
    closed: bool = False
    sealed: asyncio.Future[bytes | None] | None = None

    @property
    def path(self) -> str:
        return self.file.path


class Spool:
    def __init__(self, spool_dir: str, owner: str, sinks: Sequence[str], compression: str, level: int,
                 metrics: Metrics, *, adopt_after_s: float = 60.0) -> None:
        self.root = os.path.abspath(spool_dir)
        self.owner = lease.owner_of(owner)
        self.dir = os.path.join(self.root, self.owner)
        self.sinks = tuple(sinks)
        self.compression = compression
        self.level = level
        self.metrics = metrics
        self.adopt_after_s = adopt_after_s
        self.me = lease.Holder.me()
        self.healthy = True  # False after a failed round until a round (or the probe) succeeds
        self.lease_lost = False
        self._pool = ThreadPoolExecutor(max_workers=2 * max(1, len(self.sinks)) + 1, thread_name_prefix="spool")
        self._dirty: dict[int, Spooled] = {}
        self._tickets: list[asyncio.Future[None]] = []
        self._kick = asyncio.Event()
        self._closing = False
        self._committer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._dlq_root = ""
        self._stores: dict[str, DlqStore] = {}
        self._recovered: set[str] = set()  # owners found dead (their DLQ claims are stale at once)
        self._open_files = 0
        self._bytes = 0
        # the engine gives the bytes of records taken back out of a batch back to the queue's budget
        self.on_rollback: Callable[[int], None] | None = None
        m = metrics
        m.spool_files.set_function(lambda: self._open_files)
        m.spool_bytes.set_function(lambda: self._bytes)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, dlq_root: str, stores: Mapping[str, DlqStore]) -> None:
        """Own a fresh spool directory (with its lease); move every dead owner's spool into the
        DLQ (before any new record is batched); start the committer and the lease watcher."""
        self._dlq_root = dlq_root
        self._stores = dict(stores)
        await asyncio.to_thread(self._create_dirs)
        await self.recover_dead()
        self._committer = asyncio.create_task(self._commit_loop(), name="spool-committer")
        self._watcher = asyncio.create_task(self._watch(), name="spool-lease")

    async def recover_only(self, dlq_root: str, stores: Mapping[str, DlqStore]) -> int:
        """ACK_MODE=memory after a durable run: the spool of dead owners is still moved into the DLQ
        (acknowledged events never stay stranded), without owning a spool of our own."""
        self._dlq_root = dlq_root
        self._stores = dict(stores)
        try:
            return await self.recover_dead()
        finally:
            self._pool.shutdown(wait=False)

    async def recover_dead(self) -> int:
        """Claim the spool of every dead owner of SPOOL_DIR and move its batches into the DLQ.
        Returns the events moved."""
        owners = await asyncio.to_thread(self._dead_owners)
        total = 0
        for owner in owners:
            # an earlier run of this instance (same INSTANCE_ID, same worker) or another instance
            base = owner[len(lease.ADOPTING):].rpartition("@")[0] if owner.startswith(lease.ADOPTING) else owner
            how = "restart" if base.rpartition("-")[0] == self.owner.rpartition("-")[0] else "adoption"
            claimed = await asyncio.to_thread(lease.claim, self.root, owner, self.owner)
            if claimed is None:  # another peer got there first
                continue
            self._recovered.add(owner)
            try:
                rec = await asyncio.to_thread(recover_owner, claimed, self._dlq_root)
            except OSError as err:
                log.error("spool recovery failed: the files stay where they are", extra={
                    "owner": owner, "dir": claimed, "error": str(err)[:300]})
                continue
            for sink, dpath, size in rec.moved:
                store = self._stores.get(sink)
                name = os.path.basename(dpath)
                if store is not None:
                    store.added(Entry(unix_of_name(name) or 0, name, os.path.dirname(dpath), size))
            self.metrics.spool_recovered.labels(how).inc(rec.events)
            self.metrics.spool_torn_bytes.inc(rec.torn_bytes)
            total += rec.events
            log.warning("spool of a dead process moved into the dlq", extra={
                "owner": owner, "how": how, "files": rec.files, "events": rec.events,
                "torn_bytes": rec.torn_bytes})
        return total

    def owner_dead(self, owner: str) -> bool:
        """Blocking. A DLQ claim's owner is dead by its lease (False without a lease: unknown)."""
        if owner in self._recovered:
            return True
        d = os.path.join(self.root, owner)
        return owner != self.owner and os.path.isdir(d) and lease.is_dead(d, self.me, time.time(),
                                                                           self.adopt_after_s)

    def _probe(self) -> bool:
        """After a failed round (/ready is 503, so no traffic comes to retry it): can a small file
        be written, synced and removed in our directory again?"""
        path = os.path.join(self.dir, f".probe-{os.getpid()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, b"x" * 4096)
                os.fdatasync(fd)
            finally:
                os.close(fd)
                os.unlink(path)
        except OSError:
            return False
        return True

    def _dead_owners(self) -> list[str]:
        now = time.time()
        return (lease.dead_owners(self.root, self.me, self.owner, now, self.adopt_after_s)
                + lease.stale_adoptions(self.root, self.me, now, self.adopt_after_s))

    async def _watch(self) -> None:
        """Keep our lease fresh; now and then adopt the spool of peers that died."""
        every = max(0.5, min(5.0, self.adopt_after_s / 4))
        next_adoption = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.renew():
                    return
                if not self.healthy and await asyncio.to_thread(self._probe):
                    log.info("spool writes succeed again", extra={"owner": self.owner})
                    self.healthy = True
                if loop.time() >= next_adoption:
                    next_adoption = loop.time() + max(every, self.adopt_after_s / 2)
                    await self.recover_dead()
            except Exception:  # the watcher must not die silently
                log.exception("spool lease watcher failed", extra={"owner": self.owner})

    def _create_dirs(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        lease.write_lease(self.dir, self.me)
        for sink in self.sinks:
            os.makedirs(os.path.join(self.dir, sink), exist_ok=True)

    async def close(self) -> None:
        """After the drain: every batch is sealed; stop the committer, release our directory."""
        self._closing = True
        self._kick.set()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        for fut in self._tickets:
            if not fut.done():
                fut.set_exception(SpoolError("shutdown"))
        self._tickets.clear()
        await asyncio.to_thread(self._remove_own_dir)
        self._pool.shutdown(wait=False)

    def _remove_own_dir(self) -> None:
        """Our directory goes when nothing is left in it (else a restart recovers what is)."""
        with contextlib.suppress(OSError):
            for sink in self.sinks:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(os.path.join(self.dir, sink))
            if not any(e for e in os.listdir(self.dir) if e != lease.LEASE):
                os.unlink(os.path.join(self.dir, lease.LEASE))
                os.rmdir(self.dir)

    async def renew(self) -> bool:
        """Heartbeat: touch the lease. False once a peer adopted our spool (we were presumed dead)."""
        ok = await asyncio.to_thread(lease.renew, self.dir)
        if not ok and not self.lease_lost:
            self.lease_lost = True
            self.healthy = False
            log.error("spool lease lost: a peer adopted this instance's spool (it was presumed dead); "
                      "no event is acknowledged any more", extra={"owner": self.owner})
        return ok

    # ------------------------------------------------------------------ the engine's side

    def note(self, sink: str, batch: Batch, name: str, partition: str) -> Spooled:
        """`batch` has records that are not durable yet (it is opened here on its first call)."""
        sp: Spooled | None = batch.spool
        if sp is None:
            path = os.path.join(self.dir, sink, spool_name(partition, name))
            sp = Spooled(sink, name, partition, batch, SpoolFile(path, self.compression, self.level))
            batch.spool = sp
        self._dirty[id(sp)] = sp
        return sp

    def add_tickets(self, tickets: list[asyncio.Future[None]]) -> None:
        """Requests answered by the next round (their records were noted before this call)."""
        self._tickets += tickets
        self._kick.set()

    def kick(self) -> None:
        self._kick.set()

    def seal(self, sp: Spooled) -> asyncio.Future[bytes | None]:
        """The closed batch's data once all its records are durable (None if none of them are:
        a failed round took every record back out)."""
        sp.closed = True
        loop = asyncio.get_running_loop()
        sp.sealed = loop.create_future()
        if sp.committed >= len(sp.batch.lines):
            self._dirty.pop(id(sp), None)
            self._finish(sp)
        else:
            self._dirty[id(sp)] = sp
            self._kick.set()
        return sp.sealed

    def _finish(self, sp: Spooled) -> None:
        assert sp.sealed is not None
        data = b"".join(sp.members) if sp.members else None
        # The batch and its Spooled refer to each other: left as a cycle, the batch's lines (MBs)
        # would wait for a full collection of the cyclic GC, and under steady traffic RSS grew by
        # ~100 MB a minute before one came. Broken here, both are freed by reference counting
        # once the payload is delivered; the members are in `data` now.
        sp.batch.spool = None
        sp.members = []
        if sp.file.fd is not None:
            self._open_files -= 1
        fut = sp.sealed
        sp.file.close()  # close(2) of a local file: no flush, nothing to wait for
        if not fut.done():
            fut.set_result(data)

    def forget(self, nbytes: int) -> None:
        """A spooled batch's file left our directory (delivered, or moved into the DLQ)."""
        self._bytes -= nbytes

    # ------------------------------------------------------------------ group commit

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            if not self._dirty and not self._tickets:
                if self._closing:
                    return
                continue
            tickets, self._tickets = self._tickets, []
            work: list[tuple[Spooled, int, int]] = []
            for sp in list(self._dirty.values()):
                end = len(sp.batch.lines)
                if end > sp.committed:
                    work.append((sp, sp.committed, end))
                elif sp.closed:
                    self._finish(sp)
                del self._dirty[id(sp)]
            if not work:
                self._answer(tickets, None)
                continue
            t0 = loop.time()
            futs = [loop.run_in_executor(self._pool, _append, sp.file, sp.batch.lines[a:b], self.dir)
                    for sp, a, b in work]
            results = await asyncio.gather(*futs, return_exceptions=True)
            self.metrics.spool_fsync_seconds.observe(loop.time() - t0)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is None and self.lease_lost:
                failure = SpoolError("lease_lost")
            if failure is None:
                for (sp, _a, b), res in zip(work, results, strict=True):
                    member, offset, held = res  # type: ignore[misc]
                    if not held:
                        failure = SpoolError("lease_lost")
                    if sp.file.committed == 0:
                        self._open_files += 1
                    sp.file.committed = offset
                    sp.members.append(member)
                    sp.committed = b
                    self._bytes += len(member)
                if failure is not None:  # durable, but a peer may have taken the files: no 2xx
                    self.lease_lost = True
                    self.healthy = False
                    self._answer(tickets, SpoolError("lease_lost"))
                    continue
                if not self.healthy:
                    log.info("spool writes succeed again", extra={"owner": self.owner})
                self.healthy = True
                for sp, _a, _b in work:
                    if sp.closed and sp.committed >= len(sp.batch.lines):
                        self._finish(sp)
                self._answer(tickets, None)
            else:
                await self._rollback(work, failure)
                self._answer(tickets, failure if isinstance(failure, SpoolError) else
                             SpoolError(reason_of(failure) if isinstance(failure, OSError) else "io_error",
                                        str(failure)))

    async def _rollback(self, work: list[tuple[Spooled, int, int]], failure: BaseException) -> None:
        """A failed round: cut what reached the files, take the round's records back out of their
        batches (their requests get 503). A batch left with nothing durable is sealed empty."""
        reason = reason_of(failure) if isinstance(failure, OSError) else getattr(failure, "reason", "io_error")
        self.metrics.spool_write_errors.labels(reason).inc()
        if self.healthy:
            log.error("spool write failed: answering 503 until it succeeds again", extra={
                "owner": self.owner, "reason": reason, "error": str(failure)[:300]})
        self.healthy = False
        await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(self._pool, sp.file.rollback)
                               for sp, _a, _b in work))
        for sp, a, b in work:
            removed = sp.batch.lines[a:b]
            del sp.batch.lines[a:b]
            sp.batch.nbytes -= sum(map(len, removed))
            if self.on_rollback is not None:
                self.on_rollback(sum(map(len, removed)))
            if sp.closed:
                if sp.committed >= len(sp.batch.lines):
                    self._finish(sp)
                else:
                    self._dirty[id(sp)] = sp
        if self._dirty:
            self._kick.set()

    def _answer(self, tickets: list[asyncio.Future[None]], err: BaseException | None) -> None:
        for fut in tickets:
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)


def _append(file: SpoolFile, lines: list[bytes], owner_dir: str) -> tuple[bytes, int, bool]:
    """In a thread: the member, the new durable length, and whether our lease was still held after
    the fsync (checked after it, so a peer that adopted us later read these bytes)."""
    member, offset = file.append(lines)
    return member, offset, lease.held(owner_dir)

