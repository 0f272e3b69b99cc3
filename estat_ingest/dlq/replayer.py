"""The DLQ replayer: one background task per sink, never inside the fresh-upload path.

Invariants
- Oldest first: files are taken from the store's index by the unix time in their name.
- A pass reads at most DLQ_SCAN_LIMIT directory entries per source directory (rotating cursor)
  and attempts at most DLQ_SCAN_LIMIT files, so its cost does not grow with the backlog.
- Fresh batches first: a replay attempt starts only while the lane's upload queue has room, and at
  most DLQ_REPLAY_CONCURRENCY run at once. While the sink is failing, one probe at a time with a
  capped exponential backoff (with jitter) between probes; full speed again after a success.
- Every attempt goes through Pipeline.attempt (same timeout and metrics as fresh uploads), to the
  batch's original name and partition (idempotent on S3). The replayer never writes a new DLQ
  entry for a batch it replays (no deliver()).
- A file is claimed before it is read and verified in full before it is sent; a corrupt file is
  quarantined (never sent), a rejected one (4xx, or DLQ_MAX_ATTEMPTS failures while the sink
  accepts other files) is moved aside: S3 → DLQ_PREFIX/<partition>/<name>, others → rejected/.
  It never blocks the files behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from estat_ingest.dlq import files
from estat_ingest.dlq.scan import Entry
from estat_ingest.pipeline.encoder import CorruptPayload
from estat_ingest.pipeline.retry import Backoff
from estat_ingest.sinks.base import Outcome, Payload, Result

if TYPE_CHECKING:
    from estat_ingest.pipeline.engine import Lane, Pipeline

log = logging.getLogger("estat_ingest.dlq.replay")

SINK_BACKOFF = Backoff(base_s=0.5, cap_s=5.0)  # between probes while the sink is down
FILE_BACKOFF = Backoff(base_s=1.0, cap_s=300.0)  # a file that failed while others succeed
IDLE_S = 1.0  # pass interval when nothing is waiting (new local writes wake the replayer at once)
GATE_WAIT_S = 0.05  # re-check of a full upload queue
# rejections that say "this sink refuses everything right now" (expired credentials, missing IAM
# permission), not "this file is bad": treated as an outage, never as a reason to move files aside
SINK_WIDE_REJECTS = frozenset({"auth"})


class Replayer:
    def __init__(self, pipeline: Pipeline, lane: Lane, *, idle_s: float = IDLE_S,
                 sink_backoff: Backoff = SINK_BACKOFF, file_backoff: Backoff = FILE_BACKOFF) -> None:
        s = pipeline.settings
        self.pipeline = pipeline
        self.lane = lane
        self.sink = lane.sink
        self.store = lane.store
        self.metrics = pipeline.metrics
        self.tz = s.partition_tz
        self.dlq_prefix = s.dlq_prefix
        self.concurrency = s.dlq_replay_concurrency
        self.max_failures = s.dlq_max_attempts
        self.scan_limit = s.dlq_scan_limit
        self.idle_s = idle_s
        self.sink_backoff = sink_backoff
        self.file_backoff = file_backoff
        self.failing = 0  # consecutive failed attempts: > 0 means "sink down, probe mode"
        self.passes = 0
        self._gate_waits = 0  # times a wave waited for room in the upload queue (tests, debugging)
        self._not_before: dict[tuple[str, str], float] = {}
        self._outage_deferred: set[tuple[str, str]] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._claims: dict[tuple[str, str], str] = {}  # in flight: key → claimed path
        self._errors: dict[tuple[str, str], int] = {}  # unexpected errors per file (I/O)

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
            self.store._publish()
        return attempted > 0

    async def _gate(self) -> bool:
        """Fresh batches first: wait while the lane's upload queue is full (False when stopping)."""
        q = self.lane.upload_q
        while q.full():
            if self._stop.is_set():
                return False
            self._gate_waits += 1
            await asyncio.sleep(GATE_WAIT_S)
        return not self._stop.is_set()

    # ------------------------------------------------------------------ one file

    async def _replay_one(self, entry: Entry) -> None:
        store, d, name = self.store, entry.directory, entry.name
        cpath = await asyncio.to_thread(files.claim, d, name, store.owner)
        if cpath is None:  # another replayer has it, or it is gone
            store.gone(entry)
            return
        self._claims[entry.key] = cpath
        done = False
        try:
            done = await self._with_claim(entry, cpath)
        except Exception:  # e.g. EIO reading it: back off on this file instead of spinning on it
            self._errors[entry.key] = errors = self._errors.get(entry.key, 0) + 1
            self._not_before[entry.key] = time.time() + self.file_backoff.delay(errors)
            log.exception("dlq replay of one file failed", extra={"sink": self.sink.name, "file": name})
        finally:
            self._claims.pop(entry.key, None)
            if not done:  # give the file back (also on cancellation at shutdown)
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    released = files.release(cpath, d, name)  # one rename; awaiting is not possible now
                else:
                    released = await asyncio.to_thread(files.release, cpath, d, name)
                if released:
                    store.index.push_back(entry)
                else:
                    store.gone(entry)

    async def _with_claim(self, entry: Entry, cpath: str) -> bool:
        """True when the claim was consumed (delivered, moved aside, rewritten)."""
        store, d, name = self.store, entry.directory, entry.name
        data, meta = await asyncio.to_thread(_read, cpath, d, name)
        compression = files.compression_from(name, meta)
        try:
            events = await files.verify_async(data, compression, meta)
        except CorruptPayload as err:
            await store.quarantine(entry, cpath, str(err))
            return True
        payload = files.payload_of(name, data, meta, events, self.tz)
        result = await self.pipeline.attempt(self.sink, payload)
        if result is None:
            return False  # shutdown abort
        new_meta: dict[str, Any] = dict(meta or {"num_events": events})
        new_meta["attempts"] = payload.attempts + 1
        if result.rejected is not None:
            await self._move_rejected(entry, None, result.rejected, "rejected")
        if result.ok:  # all of it, or all but the items rejected for good (moved aside above)
            await self._delivered(entry, cpath, payload, events if result.delivered is None else result.delivered)
            return True
        if result.delivered:
            self.metrics.dlq_reuploaded.labels(self.sink.name).inc(result.delivered)
            self.metrics.events_delivered.labels(self.sink.name).inc(result.delivered)
        if result.remainder is not None:  # partial success: keep only what is worth retrying
            await self._rewrite(entry, cpath, result.remainder.with_attempts(payload.attempts + 1))
            self._healthy()
            return True
        if result.outcome is Outcome.REJECT and result.reason not in SINK_WIDE_REJECTS:
            self._healthy()  # the sink answered: it is up
            await self._reject(entry, cpath, payload, new_meta, result.reason or "rejected")
            return True
        return await self._failed(entry, cpath, payload, new_meta, result)

    async def _delivered(self, entry: Entry, cpath: str, payload: Payload, events: int) -> None:
        self._healthy()
        await self._consume(entry, cpath)
        self.metrics.dlq_reuploaded.labels(self.sink.name).inc(events)
        self.metrics.events_delivered.labels(self.sink.name).inc(events)
        log.info("dlq file delivered", extra={
            "sink": self.sink.name, "batch": entry.name, "events": events, "bytes": len(payload.data),
            "outcome": "ok", "attempts": payload.attempts + 1})

    async def _consume(self, entry: Entry, cpath: str) -> None:
        removed = await asyncio.to_thread(files.remove, cpath, entry.directory, entry.name)
        self._not_before.pop(entry.key, None)
        self._errors.pop(entry.key, None)
        if removed:
            self.store.gone(entry)
        else:  # our claim was recovered by another process while we were slow: it is back on disk
            self.store.index.push_back(entry)

    async def _rewrite(self, entry: Entry, cpath: str, remainder: Payload) -> None:
        def write() -> None:
            self.store.write_sync(replace(remainder, name=entry.name), "partial", directory=entry.directory)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cpath)

        await asyncio.to_thread(write)
        self.store.gone(entry)
        self.store.added(Entry(entry.unix, entry.name, entry.directory, len(remainder.data)))

    def _healthy(self) -> None:
        if self.failing:
            log.info("dlq replay: sink recovered", extra={"sink": self.sink.name,
                                                          "failed_probes": self.failing})
        self.failing = 0
        for key in self._outage_deferred:
            self._not_before.pop(key, None)
        self._outage_deferred.clear()

    async def _failed(self, entry: Entry, cpath: str, payload: Payload, meta: dict[str, Any],
                      result: Result) -> bool:
        file_specific = self.failing == 0  # others were going through: this file's own failure
        self.failing += 1
        meta["last_error"] = result.reason or result.outcome.value
        now = time.time()
        if file_specific:
            strikes = int(meta.get("replay_failures", 0) or 0) + 1
            meta["replay_failures"] = strikes
            if strikes >= self.max_failures:
                self.failing = 0
                await self._reject(entry, cpath, payload, meta, f"max_attempts:{meta['last_error']}")
                return True
            self._not_before[entry.key] = now + self.file_backoff.delay(strikes)
        else:  # the sink is down: rotate the probe to another file, forget this on recovery
            self._not_before[entry.key] = now + self.sink_backoff.delay(self.failing)
            self._outage_deferred.add(entry.key)
        await asyncio.to_thread(files.write_meta, entry.directory, entry.name, meta)
        return False

    async def _reject(self, entry: Entry, cpath: str, payload: Payload, meta: dict[str, Any],
                      reason: str) -> None:
        meta["rejected_reason"] = reason
        await asyncio.to_thread(files.write_meta, entry.directory, entry.name, meta)
        moved_to = await self._move_rejected(entry, cpath, payload, reason)
        if moved_to is not None:
            self.store.gone(entry)
        else:
            await self._consume(entry, cpath)

    async def _move_rejected(self, entry: Entry, cpath: str | None, payload: Payload, reason: str
                             ) -> str | None:
        """S3: PutObject under DLQ_PREFIX (same partition and name); otherwise (or if that fails)
        move the file to `<dir>/rejected/`. Returns the local path when moved locally."""
        sink_name = self.sink.name
        put = getattr(self.sink, "put", None)
        key_of = getattr(self.sink, "key_of", None)
        if put is not None and key_of is not None:
            key = key_of(payload, prefix=self.dlq_prefix)
            try:
                async with asyncio.timeout(self.sink.timeout_s):
                    res: Result = await put(key, payload)
            except TimeoutError:
                res = Result(Outcome.RETRY, "timeout")
            if res.ok:
                self.metrics.dlq_rejected.labels(sink_name).inc(payload.num_events)
                log.error("dlq file rejected by the sink, stored under DLQ_PREFIX", extra={
                    "sink": sink_name, "file": payload.name, "events": payload.num_events,
                    "reason": reason, "key": key})
                return None
        d = entry.directory
        if cpath is None:  # a partial rejection (items): write it beside the others
            await asyncio.to_thread(self.store.write_sync, payload, reason,
                                    os.path.join(d, files.REJECTED))
            dest = d
        else:
            dest = await asyncio.to_thread(files.move_aside, cpath, d, entry.name, files.REJECTED)
        self.metrics.dlq_rejected.labels(sink_name).inc(payload.num_events)
        log.error("dlq file rejected by the sink, moved aside", extra={
            "sink": sink_name, "file": payload.name, "events": payload.num_events, "reason": reason,
            "moved_to": dest})
        return dest


def _read(cpath: str, directory: str, name: str) -> tuple[bytes, dict[str, Any] | None]:
    return files.read_file(cpath), files.read_meta(directory, name)
