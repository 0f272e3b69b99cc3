"""The DLQ replayer: one background task per sink, never inside the fresh-upload path.

Invariants
- Oldest first: files are taken from the store's index by the unix time in their name.
- A pass reads at most DLQ_SCAN_LIMIT directory entries per source directory (rotating cursor)
  and attempts at most DLQ_SCAN_LIMIT files, so its cost does not grow with the backlog.
- Fresh batches first: a replay attempt starts only while the lane's upload queue has room (the
  `room` event, set by the upload queue), and at most DLQ_REPLAY_CONCURRENCY run at once. While
  the sink is failing (or refuses everything: an outage), one probe at a time with a capped
  exponential backoff (with jitter) between probes; full speed again after a success.
- Every attempt is one `Delivery.run(payload, attempts=1)` (same timeout, metrics and meaning of a
  Result as fresh uploads), to the batch's original name and partition (idempotent on S3); what
  becomes of the file is `dlq.settle`'s. The replayer never writes a new DLQ entry for a batch it
  replays.
- A file is claimed before it is read and verified in full before it is sent; a corrupt file is
  quarantined (never sent), a rejected one (its own 4xx, or DLQ_MAX_ATTEMPTS failures while the
  sink accepts other files) is set aside: S3 → DLQ_PREFIX/<partition>/<name>, others → rejected/.
  It never blocks the files behind it. An outage never moves a file aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from estat_ingest.delivery import Backoff, Delivery, Final, Next
from estat_ingest.dlq import files
from estat_ingest.dlq.scan import Entry
from estat_ingest.dlq.settle import reject, settle
from estat_ingest.dlq.store import DlqStore
from estat_ingest.formats.codec import CorruptPayload

if TYPE_CHECKING:
    from estat_ingest.config import Settings

log = logging.getLogger("estat_ingest.dlq.replay")

SINK_BACKOFF = Backoff(base_s=0.5, cap_s=5.0)  # between probes while the sink is down
FILE_BACKOFF = Backoff(base_s=1.0, cap_s=300.0)  # a file that failed while others succeed
IDLE_S = 1.0  # pass interval when nothing is waiting (new local writes wake the replayer at once)


class Replayer:
    def __init__(self, store: DlqStore, delivery: Delivery, room: asyncio.Event, settings: Settings, *,
                 idle_s: float = IDLE_S, sink_backoff: Backoff = SINK_BACKOFF,
                 file_backoff: Backoff = FILE_BACKOFF) -> None:
        s = settings
        self.store = store
        self.delivery = delivery
        self.sink = delivery.sink
        self.metrics = delivery.metrics
        self.room = room  # set while the lane's upload queue has room for a fresh batch
        self.tz = s.partition_tz
        self.concurrency = s.dlq_replay_concurrency
        self.max_failures = s.dlq_max_attempts
        self.scan_limit = s.dlq_scan_limit
        self.idle_s = idle_s
        self.sink_backoff = sink_backoff
        self.file_backoff = file_backoff
        self.failing = 0  # consecutive failed attempts: > 0 means "sink down, probe mode"
        self.passes = 0
        self.room_waits = 0  # times a pass waited for room in the upload queue
        self.waiting_for_room = False
        self._not_before: dict[tuple[str, str], float] = {}
        self._outage_deferred: set[tuple[str, str]] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._errors: dict[tuple[str, str], int] = {}  # unexpected errors per file (I/O)
        self._claim_error_logged = -1e9  # monotonic time of the last "could not be claimed" line
        self._claim_errors_suppressed = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"dlq-replay-{self.sink.name}")

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop before the drain: in-flight attempts get `grace_s`, then claims are given back."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), grace_s)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        try:  # the rest of the start-up scan, if start() ran out of its budget
            await self.store.finish_start()
        except Exception:
            log.exception("dlq start-up scan failed", extra={"sink": self.sink.name})
        while not self._stop.is_set():
            try:
                worked = await self.run_pass()
            except Exception:  # the replayer must never die silently
                log.exception("dlq replay pass failed", extra={"sink": self.sink.name})
                worked = False
            if self._stop.is_set():
                break
            if worked and not self.failing:
                await asyncio.sleep(0)
                continue
            await self._wait(self.sink_backoff.delay(self.failing) if self.failing else self.idle_s,
                             wake_on_write=not self.failing)

    async def _wait(self, delay: float, wake_on_write: bool) -> None:
        waiters = [asyncio.ensure_future(self._stop.wait())]
        if wake_on_write:
            waiters.append(asyncio.ensure_future(self.store.changed.wait()))
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        self.store.changed.clear()

    # ------------------------------------------------------------------ one pass

    async def run_pass(self) -> bool:
        """Rescan a chunk, apply TTL/capacity, attempt up to DLQ_SCAN_LIMIT files. True if any was."""
        self.passes += 1
        self.store.changed.clear()
        await self.store.rescan()
        await self.store.enforce()
        index = self.store.index
        attempted = 0
        deferred: list[Entry] = []
        try:
            while attempted < self.scan_limit and not self._stop.is_set():
                if not await self._gate():
                    break
                width = 1 if self.failing else self.concurrency
                now = time.time()
                batch: list[Entry] = []
                while len(batch) < width and len(deferred) < self.scan_limit:
                    e = index.pop()
                    if e is None:
                        break
                    if self._not_before.get(e.key, 0.0) > now:
                        deferred.append(e)
                        continue
                    batch.append(e)
                if not batch:
                    break
                await asyncio.gather(*(self._replay_one(e) for e in batch))
                attempted += len(batch)
                if self.failing:
                    break  # one probe per backoff interval while the sink is down
        finally:
            for e in deferred:
                index.push_back(e)
            self.store.publish()
        return attempted > 0

    async def _gate(self) -> bool:
        """Fresh batches first: wait until the lane's upload queue has room (False when stopping)."""
        if not self.room.is_set():
            self.room_waits += 1
            self.waiting_for_room = True
            stop = asyncio.ensure_future(self._stop.wait())
            room = asyncio.ensure_future(self.room.wait())
            try:
                await asyncio.wait((stop, room), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.waiting_for_room = False
                stop.cancel()
                room.cancel()
        return not self._stop.is_set()

    # ------------------------------------------------------------------ one file

    async def _replay_one(self, entry: Entry) -> None:
        store, d, name = self.store, entry.directory, entry.name
        try:
            cpath = await asyncio.to_thread(files.claim, d, name, store.owner)
        except OSError as err:  # read-only, no permission: the file stays where it is and is tried again
            self._claim_failed(entry, err)
            return
        if cpath is None:  # another replayer has it, or it is gone
            store.gone(entry)
            return
        done = False
        try:
            done = await self._with_claim(entry, cpath)
        except Exception:  # e.g. EIO reading it: back off on this file instead of spinning on it
            self._errors[entry.key] = errors = self._errors.get(entry.key, 0) + 1
            self._not_before[entry.key] = time.time() + self.file_backoff.delay(errors)
            log.exception("dlq replay of one file failed", extra={"sink": self.sink.name, "file": name})
        finally:
            if not done:  # give the file back (also on cancellation at shutdown)
                task = asyncio.current_task()
                try:
                    if task is not None and task.cancelling():
                        released = files.release(cpath, d, name)  # one rename; awaiting is not possible now
                    else:
                        released = await asyncio.to_thread(files.release, cpath, d, name)
                except OSError as err:  # e.g. remounted read-only meanwhile: its claim goes stale and is
                    # recovered by a scan (DLQ_CLAIM_TIMEOUT) once the directory is writable again
                    log.error("dlq claim could not be given back", extra={
                        "sink": self.sink.name, "file": name, "error": str(err)})
                    released = False
                if released:
                    store.index.push_back(entry)
                else:
                    store.gone(entry)

    async def _with_claim(self, entry: Entry, cpath: str) -> bool:
        """True when the claim was consumed (delivered, rewritten, set aside, quarantined)."""
        store, d, name = self.store, entry.directory, entry.name
        data, meta = await asyncio.to_thread(_read, cpath, d, name)
        try:
            events = await files.verify_async(data, files.compression_from(name, meta), meta)
        except CorruptPayload as err:
            await store.quarantine(entry, cpath, str(err))
            return True
        payload = files.payload_of(name, data, meta, events, self.tz)
        final = await self.delivery.run(payload, attempts=1)
        if final.next is None:
            return False  # shutdown abort
        if final.delivered:
            self.metrics.dlq_reuploaded.labels(self.sink.name).inc(final.delivered)
            self.metrics.events_delivered.labels(self.sink.name).inc(final.delivered)
        settled = await settle(store, self.sink, entry, cpath, final)
        if settled is not None:
            self._forget(entry)
            if settled.kind == "delivered":
                log.info("dlq file delivered", extra={
                    "sink": self.sink.name, "batch": name, "events": final.delivered,
                    "bytes": len(data), "outcome": "ok", "attempts": final.payload.attempts})
            if final.next is Next.OUTAGE:
                self.failing += 1  # partly delivered, the rest refused with the whole destination: back off
            else:
                self._healthy()  # the sink answered: it is up
            return True
        return await self._failed(entry, cpath, final, meta or {"num_events": events})

    def _claim_failed(self, entry: Entry, err: OSError) -> None:
        """The directory refuses the claim (EACCES, EROFS): the file stays in the index and is tried
        again after a backoff; while claims fail the replayer probes one file at a time."""
        self.failing += 1
        self._not_before[entry.key] = time.time() + self.sink_backoff.delay(self.failing)
        self._outage_deferred.add(entry.key)  # eligible again at once after the next success
        self.store.index.push_back(entry)
        now = time.monotonic()
        if now - self._claim_error_logged >= 10.0:
            self._claim_error_logged = now
            log.error("dlq file could not be claimed: retried with backoff", extra={
                "sink": self.sink.name, "file": entry.name, "error": str(err),
                "suppressed": self._claim_errors_suppressed})
            self._claim_errors_suppressed = 0
        else:
            self._claim_errors_suppressed += 1

    def _forget(self, entry: Entry) -> None:
        self._not_before.pop(entry.key, None)
        self._errors.pop(entry.key, None)

    def _healthy(self) -> None:
        if self.failing:
            log.info("dlq replay: sink recovered", extra={"sink": self.sink.name,
                                                          "failed_probes": self.failing})
        self.failing = 0
        for key in self._outage_deferred:
            self._not_before.pop(key, None)
        self._outage_deferred.clear()

    async def _failed(self, entry: Entry, cpath: str, final: Final, meta: dict[str, Any]) -> bool:
        """A retryable failure or an outage: back off. A file that fails alone while the sink takes
        other files gets a strike; DLQ_MAX_ATTEMPTS strikes set it aside."""
        # an outage is about the destination, never this file; otherwise, if others were going
        # through, this failure is the file's own
        file_specific = self.failing == 0 and final.next is not Next.OUTAGE
        self.failing += 1
        meta = dict(meta)
        meta["attempts"] = final.payload.attempts
        meta["last_error"] = final.reason
        now = time.time()
        if file_specific:
            strikes = int(meta.get("replay_failures", 0) or 0) + 1
            meta["replay_failures"] = strikes
            if strikes >= self.max_failures:
                self.failing = 0
                await reject(self.store, self.sink, entry, cpath, final.payload, f"max_attempts:{final.reason}", meta)
                self._forget(entry)
                return True
            self._not_before[entry.key] = now + self.file_backoff.delay(strikes)
        else:  # the sink is down: rotate the probe to another file, forget this on recovery
            self._not_before[entry.key] = now + self.sink_backoff.delay(self.failing)
            self._outage_deferred.add(entry.key)
        # a full or read-only disk: the bookkeeping waits, the file itself is untouched
        with contextlib.suppress(OSError):
            await asyncio.to_thread(files.write_meta, entry.directory, entry.name, meta)
        return False


def _read(cpath: str, directory: str, name: str) -> tuple[bytes, dict[str, Any] | None]:
    return files.read_file(cpath), files.read_meta(directory, name)
