"""The engine: the loops that move records from the queue to the sinks or the DLQ.

Invariants
- Every record that entered the queue ends in exactly one of: a sink, or a DLQ file. A batch that
  neither the sink nor the DLQ takes (no space, read-only, no permission, DLQ full with
  DLQ_WHEN_FULL=reject) is held in memory (`Lane.held`) with its bytes still charged to
  BUFFER_MAX_BYTES, and offered to the sink and the DLQ again with backoff until one takes it: the
  budget fills and /collect answers 503 `dlq_unavailable` instead of a 2xx for an event the server
  could not keep (fail closed, DESIGN.md §2.8). Only the drain's deadline ends that; what is still
  held then is counted lost (`lost_events`, dlq_events_dropped_total) and logged — unless it has a
  spool file (ACK_MODE=durable), which stays for the next start.
- One dispatcher task owns every batcher (no locks); each sink ("lane") has its own batcher, upload
  queue, uploaders, retry state and DLQ directory.
- Backpressure: with one sink, a full upload queue blocks the dispatcher, the event queue fills and
  /collect answers 503. With several sinks, a lane whose upload queue is full spills its closed
  batch to its own DLQ instead of stalling the others.
- A batch's name and partition are fixed when it closes; every attempt and replay uses them.
- Blocking work (compression, DLQ writes) runs in threads; JSON work never does.
- Memory: the queue charges every accepted line to BUFFER_MAX_BYTES (once per lane) and each lane
  gives its batch's bytes back when the batch is delivered or spilled. While the budget is spent,
  /collect answers 503 and the dispatcher closes open batches that hold a real share of it early,
  so the budget drains instead of waiting for FLUSH_INTERVAL.
- `drain(deadline)`: close the queue, flush partial batches, deliver until the deadline, then
  abort: whatever is queued or in flight is written to the DLQ. A second signal aborts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from estat_ingest.config import Settings
from estat_ingest.delivery import Abort, Backoff, Delivery, Next
from estat_ingest.dlq.replayer import Replayer
from estat_ingest.dlq.store import DlqStore
from estat_ingest.formats.codec import encode_lines
from estat_ingest.formats.keys import Namer, partition
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.batcher import Batch, Batcher
from estat_ingest.pipeline.queue import EventQueue
from estat_ingest.pipeline.threads import encode_pool
from estat_ingest.sinks.base import Payload, Sink
from estat_ingest.spool import lease
from estat_ingest.spool.writer import Spool

log = logging.getLogger("estat_ingest.engine")

Item = tuple[float, bytes]  # (receive time, JSONL line)
# The dispatcher takes everything queued at each wake-up: it runs once per loop iteration, and a
# bound per take (it was 1024) capped the events accepted per iteration, so at 64 NDJSON
# connections most requests met a full queue (CHANNEL_SIZE bounds a take anyway).
TAKE_ALL = None
# Overflow spills (fan-out) run beside the dispatcher so a down sink's DLQ writes do not hold up
# the healthy sinks; at most this many per lane, then the dispatcher waits (memory stays bounded).
MAX_PENDING_SPILLS = 2
# why a batch that was not delivered went to the DLQ, by where its delivery run ended
_DROP_REASON = {"full": "capacity", "too_large": "capacity"}  # a DLQ refusal → dlq_events_dropped_total{reason}
# between offers of the oldest held batch to the sink and the DLQ, while both refuse it
HELD_BACKOFF = Backoff(base_s=0.5, cap_s=5.0)
DLQ_UNAVAILABLE = "dlq_unavailable"  # the reason of the 503s while batches are held
_SPILL_REASON = {None: "shutdown", Next.RETRY: "failed", Next.REJECTED: "rejected", Next.OUTAGE: "outage"}


@dataclass(slots=True)
class Closed:
    """A closed batch on its way to an uploader: its payload is being made when it closes
    (compressed in memory mode; in durable mode, its last records made durable)."""

    batch: Batch  # its JSONL bytes are charged to the budget, given back when delivered or spilled
    encoding: asyncio.Future[Payload | None]  # None: nothing of it was kept (a failed spool round)


class UploadQueue:
    """A lane's closed batches waiting for an uploader. `room` is set while one more fits: the
    replayer waits on it, so replays never take an uploader's place from a fresh batch."""

    def __init__(self, maxsize: int) -> None:
        self._q: asyncio.Queue[Closed | None] = asyncio.Queue(maxsize)
        self.room = asyncio.Event()
        self.room.set()

    def qsize(self) -> int:
        return self._q.qsize()

    @property
    def maxsize(self) -> int:
        return self._q.maxsize

    def full(self) -> bool:
        return self._q.full()

    async def put(self, item: Closed | None) -> None:
        await self._q.put(item)
        if self._q.full():
            self.room.clear()

    async def get(self) -> Closed | None:
        item = await self._q.get()
        if not self._q.full():
            self.room.set()
        return item


@dataclass(slots=True)
class Held:
    """A batch neither the sink nor the DLQ took: kept in memory, its bytes charged to the budget."""

    payload: Payload
    reason: str  # why it is not delivered: the DLQ reason it will be written with (failed, outage …)
    cost: int  # bytes charged to BUFFER_MAX_BYTES while it is held (what it holds in memory)
    refusal: str  # why the DLQ refused it the last time


@dataclass(slots=True)
class Lane:
    sink: Sink
    batcher: Batcher
    upload_q: UploadQueue
    store: DlqStore
    delivery: Delivery
    concurrency: int
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    spills: set[asyncio.Task[None]] = field(default_factory=set)  # overflow spills under way
    held: deque[Held] = field(default_factory=deque)  # oldest first
    held_task: asyncio.Task[None] | None = None  # offers the held batches again (one per lane)


@dataclass(slots=True)
class Counts:
    delivered_events: int = 0
    spilled_events: int = 0  # written to the DLQ
    lost_events: int = 0  # still held (neither the sink nor the DLQ took them) when the drain ended
    dropped_events: int = 0  # deleted from the DLQ by policy: ttl, capacity (drop_oldest), corrupt


@dataclass(slots=True)
class DrainReport(Counts):
    """Totals since start (the fields) and this drain's share (`drain`: the `shutdown complete`
    line's delivered/spilled/lost/dropped; the totals are its lifetime_* fields)."""

    aborted: bool = False
    drain: Counts = field(default_factory=Counts)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        sinks: Sequence[Sink],
        *,
        worker: int | None = None,
        dlq_root: str | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.queue: EventQueue[Item] = EventQueue(settings.channel_size, settings.buffer_max_bytes,
                                                  _line_size, max(1, len(sinks)))
        self.namer = Namer(settings.instance_id, settings.ext, worker)
        self.dlq_root = dlq_root or settings.dlq_dir
        self._abort = Abort()
        self.lanes: list[Lane] = []
        for sink in sinks:
            spec = sink.spec
            b = spec.batching
            self.lanes.append(Lane(
                sink=sink,
                batcher=(Batcher(b.max_events, b.max_bytes, b.interval_s) if b is not None else
                         Batcher(settings.batch_max_events, settings.batch_max_bytes, settings.flush_interval_s)),
                upload_q=UploadQueue(settings.upload_queue_batches),
                store=DlqStore(self.dlq_root, sink.name, metrics, settings=settings, reads_v1=spec.reads_v1_dlq,
                               owner=lease.owner_of(self.namer.instance)),
                delivery=Delivery(sink, metrics, backoff=backoff, abort=self._abort),
                concurrency=spec.concurrency or settings.upload_concurrency,
            ))
        self.fan_out = len(self.lanes) > 1
        # ACK_MODE=durable: open batches are spool files and a request is answered after its fsync
        self.spool: Spool | None = None
        self._spool_dir = settings.spool_dir or os.path.join(settings.dlq_dir, "spool")
        if settings.ack_mode == "durable":
            self.spool = Spool(self._spool_dir, self.namer.instance,
                               [lane.sink.name for lane in self.lanes], settings.compression, self._level(),
                               metrics, adopt_after_s=settings.spool_adopt_after_s)
            self.spool.on_rollback = self.queue.release
            for lane in self.lanes:  # a claim of a process whose lease says it died is recovered at once
                lane.store.owner_dead = self.spool.owner_dead
        # compression threads (lower CPU priority than the loop, see threads.py): one per uploader
        # and per possible overflow spill, so an encode never waits for a thread
        self._pool = encode_pool(sum(lane.concurrency for lane in self.lanes)
                                 + (MAX_PENDING_SPILLS * len(self.lanes) if self.fan_out else 0) + 1)
        self.report = DrainReport()
        self._dispatcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff: list[tuple[Lane, Batch]] = []  # closed by `relieve`, handed over by the dispatcher
        self._background: set[asyncio.Task[None]] = set()
        # one per lane, started last, stopped first; each gets the lane's delivery and its room event
        self.replayers = [Replayer(lane.store, lane.delivery, lane.upload_q.room, settings) for lane in self.lanes]
        self._started: list[Sink] = []  # sinks whose start() returned, closed in reverse by drain()
        self._force_flush = False
        self._open_batches = 0  # closed but not yet delivered or spilled
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.queue_capacity.set(settings.channel_size)
        metrics.queue_depth.set_function(lambda: len(self.queue))
        metrics.buffer_capacity.set(settings.buffer_max_bytes)
        metrics.buffer_bytes.set_function(lambda: self.queue.held_bytes)
        for lane in self.lanes:
            metrics.upload_queue_depth.labels(lane.sink.name).set_function(lane.upload_q.qsize)
        metrics.declare_sinks(lane.sink.name for lane in self.lanes)  # every per-sink series at 0 from the first scrape

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Sinks and DLQ stores in order, then the loops. If a part fails to start, what started
        is closed again (in reverse) before the error propagates."""
        try:
            for lane in self.lanes:
                await lane.sink.start()
                self._started.append(lane.sink)
                await lane.store.start()
        except BaseException:
            await self._close_sinks()
            self._pool.shutdown(wait=False)
            raise
        stores = {lane.sink.name: lane.store for lane in self.lanes}
        if self.spool is not None:  # a crash's spool files first, under their fixed names
            await self.spool.start(self.dlq_root, stores)
        elif await asyncio.to_thread(os.path.isdir, self._spool_dir):  # memory mode after a durable run
            await Spool(self._spool_dir, self.namer.instance, [lane.sink.name for lane in self.lanes],
                        self.settings.compression, self._level(), self.metrics,
                        adopt_after_s=self.settings.spool_adopt_after_s).recover_only(self.dlq_root, stores)
        for lane in self.lanes:
            self._spawn(self._probe(lane.sink))
        self._loop = asyncio.get_running_loop()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="dispatcher")
        for lane in self.lanes:
            for i in range(lane.concurrency):
                lane.tasks.append(asyncio.create_task(self._upload_loop(lane), name=f"upload-{lane.sink.name}-{i}"))
        for replayer in self.replayers:
            replayer.start()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _probe(self, sink: Sink) -> None:
        try:
            await sink.check()
        except Exception:  # a probe never takes the server down
            log.exception("sink check crashed", extra={"sink": sink.name})

    async def _close_sinks(self) -> None:
        while self._started:
            sink = self._started.pop()
            try:
                await sink.aclose()
            except Exception:
                log.exception("sink close failed", extra={"sink": sink.name})

    def abort(self) -> None:
        """Skip to the spill: stop attempts, write everything undelivered to the DLQ."""
        self._abort.set()

    async def drain(self, timeout_s: float) -> DrainReport:
        """Close the queue and deliver what is left within `timeout_s`, then spill to the DLQ."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._count_dropped()
        before = Counts(self.report.delivered_events, self.report.spilled_events, self.report.lost_events,
                        self.report.dropped_events)
        for replayer in self.replayers:  # replay yields to the drain: claims are given back
            await replayer.stop()
        self.queue.close()
        tasks = [t for t in [self._dispatcher, *(t for lane in self.lanes for t in lane.tasks)] if t]
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        if pending:
            self.report.aborted = True
            log.warning("shutdown budget spent: spilling the rest to the dlq",
                        extra={"pending_tasks": len(pending)})
            self.abort()
            await asyncio.wait(pending)  # spills are bounded by the disk, not by the sink
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                log.error("pipeline task failed", exc_info=t.exception())
        await self._drain_held(deadline)
        self._count_dropped()
        r = self.report
        r.drain = Counts(r.delivered_events - before.delivered_events, r.spilled_events - before.spilled_events,
                         r.lost_events - before.lost_events, r.dropped_events - before.dropped_events)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._close_sinks()
        if self.spool is not None:
            await self.spool.close()
        self._pool.shutdown(wait=False)  # every encode has returned: the tasks that awaited them are done
        return self.report

    # ------------------------------------------------------------------ test seam

    async def flush_and_wait(self) -> None:
        """Burst mode: close every open batch now and wait until all are delivered or spilled."""
        while (len(self.queue) or any(lane.batcher.pending for lane in self.lanes) or self._open_batches
               or self._handoff):
            self._force_flush = True
            self.queue.wake()
            await asyncio.sleep(0)
            if self._open_batches:
                await self._idle.wait()

    # ------------------------------------------------------------------ dispatcher

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        queue, lanes = self.queue, self.lanes
        while True:
            deadlines = [lane.batcher.deadline for lane in lanes if lane.batcher.deadline is not None]
            timeout = None if not deadlines else max(0.0, min(deadlines) - loop.time())
            items = await queue.take(TAKE_ALL, timeout)
            while self._handoff:  # batches `relieve` closed while this task was parked in `take`: first
                lane, b = self._handoff.pop(0)
                await self._hand_over(lane, b)
            if items is None:
                break
            now = loop.time()
            closed = [(lane, lane.batcher.add_many(items, now)) for lane in lanes]
            if self.spool is not None:  # before any await: the next round covers these records
                self._note(closed)
            for lane, batches in closed:
                for b in batches:
                    await self._hand_over(lane, b)
            now = loop.time()
            force, self._force_flush = self._force_flush, False
            # budget spent: close batches holding a real share of it, so it drains now rather than
            # at FLUSH_INTERVAL (small leftovers wait, so overload does not mean tiny objects)
            share = queue.max_bytes // (4 * max(1, len(lanes))) if queue.over_budget else None
            for lane in lanes:
                if force or lane.batcher.due(now) or (share is not None and lane.batcher.nbytes >= share):
                    due = lane.batcher.take()
                    if due is not None:
                        await self._hand_over(lane, due)
        for lane in lanes:  # queue closed and empty: flush every partial batch
            last = lane.batcher.take()
            if last is not None:
                await self._hand_over(lane, last)
        for lane in lanes:
            if lane.spills:
                await asyncio.wait(lane.spills)
            for _ in lane.tasks:
                await lane.upload_q.put(None)

    def relieve(self) -> bool:
        """Synchronous, for a /collect handler that found the queue full: do the dispatcher's next
        take now — move what the queue holds into the batchers — if the dispatcher is parked in
        `take` (so nothing else is under way). Batches this closes are handed over by the
        dispatcher, first, when it runs (it is woken); per lane, at most as many wait as its upload
        queue holds (UPLOAD_QUEUE), counting what that queue already holds.

        The dispatcher runs once per loop iteration, and one iteration can bring more events than
        CHANNEL_SIZE (64 NDJSON connections x 100 events): without this, most of them met a full
        queue while the pipeline behind it had room. Backpressure is unchanged: while the
        dispatcher waits for an upload queue (or its hand-overs), this does nothing, the queue
        stays full and /collect answers 503. True when something was moved."""
        queue = self.queue
        if not queue.parked or not len(queue) or self._abort.is_set() or self._loop is None:
            return False
        handoff = self._handoff
        if handoff and any(lane.upload_q.qsize() + sum(1 for ln, _ in handoff if ln is lane) >= lane.upload_q.maxsize
                           for lane in self.lanes):
            return False  # as many closed batches as its upload queue holds wait already: that is the bound
        items = queue.take_now(TAKE_ALL)
        now = self._loop.time()
        closed = [(lane, lane.batcher.add_many(items, now)) for lane in self.lanes]
        if self.spool is not None:  # as the dispatcher does: the next round covers these records
            self._note(closed)
        for lane, batches in closed:
            handoff.extend((lane, b) for b in batches)
        if handoff:
            queue.wake()
        return True

    def _note(self, closed: list[tuple[Lane, list[Batch]]]) -> None:
        """Durable mode: tell the spool which batches got records, then which requests they answer."""
        spool = self.spool
        assert spool is not None
        for lane, batches in closed:
            for b in [*batches, lane.batcher.current]:
                if b is not None and b.lines:
                    sp = b.spool
                    if sp is None:
                        spool.note(lane.sink.name, b, self.namer.next(b.first_ts),
                                   partition(b.first_ts, self.settings.partition_tz))
                    else:
                        spool.note(sp.sink, b, sp.name, sp.partition)
        spool.add_tickets(self.queue.take_tickets())

    async def _hand_over(self, lane: Lane, batch: Batch) -> None:
        m = self.metrics
        m.batch_events.labels(lane.sink.name).observe(len(batch))
        m.batch_bytes.labels(lane.sink.name).observe(batch.nbytes)
        if self._abort.is_set():
            try:
                p = await self._payload(lane, batch)
                if p is not None and await self._spill(lane, p, "shutdown"):
                    await self._drop_file(p)
            finally:
                self.queue.release(batch.nbytes)
            return
        if self.fan_out and lane.upload_q.full():
            if len(lane.spills) >= MAX_PENDING_SPILLS:
                await asyncio.wait(lane.spills, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._overflow(lane, batch), name=f"spill-{lane.sink.name}")
            lane.spills.add(task)
            task.add_done_callback(lane.spills.discard)
            return
        self._open_batches += 1
        self._idle.clear()
        # the payload is made now (compressed, or in durable mode sealed), not when an uploader is
        # free: it overlaps the uploads ahead of it, so an uploader's turn is only the send — each
        # await costs a loop iteration, which is long when the loop is saturated, and a turn that
        # also compressed would cap a lane's deliveries at a few dozen batches per second
        await lane.upload_q.put(Closed(batch, self._start_payload(lane, batch)))

    async def _overflow(self, lane: Lane, batch: Batch) -> None:
        try:
            p = await self._payload(lane, batch)
            if p is not None and await self._spill(lane, p, "overflow"):
                await self._drop_file(p)
        finally:
            self.queue.release(batch.nbytes)

    # ------------------------------------------------------------------ uploaders

    async def _upload_loop(self, lane: Lane) -> None:
        while True:
            closed = await lane.upload_q.get()
            if closed is None:
                return
            try:
                payload = await closed.encoding
                if payload is None:
                    self._batch_done()
                else:
                    await self.deliver(lane, payload)
            finally:
                self.queue.release(closed.batch.nbytes)
                # not held while this uploader waits for the next batch (a batch is MBs)
                closed = payload = None

    def _level(self) -> int:
        s = self.settings
        return s.zstd_level if s.compression == "zstd" else s.gzip_level

    async def _payload(self, lane: Lane, batch: Batch) -> Payload | None:
        """The closed batch as a payload: its spool members (durable mode, None if a failed round
        left nothing of it), or compressed now (memory mode)."""
        if self.spool is None or batch.spool is None:
            return await self._encode(lane, batch)
        sp = batch.spool
        data = await self.spool.seal(sp)
        if data is None:
            return None
        return Payload(name=sp.name, partition=sp.partition, num_events=len(batch), data=data,
                       compression=self.settings.compression, first_ts=batch.first_ts,
                       lines=tuple(batch.lines) if lane.sink.spec.keeps_lines else None, file=sp.path)

    def _start_payload(self, lane: Lane, batch: Batch) -> asyncio.Future[Payload | None]:
        """`_payload` under way. In memory mode the executor's own future, whose thread builds the
        payload: no task between the thread and the uploader that awaits it. Each hop from a
        thread or a task to another costs a loop iteration, and at 64 NDJSON connections an
        iteration takes ≈ 15 ms: a task here made the uploaders' turn two iterations longer, so
        the upload queue filled while the core had room (503s)."""
        if self.spool is None or batch.spool is None:
            return self._start_encode(lane, batch)
        return asyncio.ensure_future(self._payload(lane, batch))

    def _start_encode(self, lane: Lane, batch: Batch) -> asyncio.Future[Payload | None]:
        s = self.settings
        kept = tuple(batch.lines) if lane.sink.spec.keeps_lines else None
        # the name and the partition are fixed now, on the loop, in the order batches close
        head = Payload(name=self.namer.next(batch.first_ts), partition=partition(batch.first_ts, s.partition_tz),
                       num_events=len(batch), data=b"", compression=s.compression, first_ts=batch.first_ts,
                       lines=kept)
        observe = self.metrics.batch_compressed_bytes.labels(lane.sink.name).observe  # thread-safe
        return asyncio.get_running_loop().run_in_executor(
            self._pool, _encode_payload, head, batch.lines, batch.nbytes, self._level(), observe)

    async def _encode(self, lane: Lane, batch: Batch) -> Payload:
        payload = await self._start_encode(lane, batch)
        assert payload is not None
        return payload

    async def deliver(self, lane: Lane, payload: Payload) -> None:
        """The lane's delivery run; whatever it could not deliver goes to the DLQ."""
        try:
            final = await lane.delivery.run(payload)
            for items in final.set_aside:  # items rejected for good: to the DLQ with their errors
                await self._spill(lane, items, "rejected")
            if final.delivered:
                self._delivered(lane, final.delivered)
            if final.next is Next.DELIVERED:
                log.info("batch delivered", extra={
                    "sink": lane.sink.name, "batch": payload.name, "events": final.delivered,
                    "bytes": len(payload.data), "outcome": "ok", "attempts": final.payload.attempts})
                await self._drop_file(payload)
                return
            if await self._spill(lane, final.payload, _SPILL_REASON[final.next]):
                await self._drop_file(payload)  # moved in by rename, or a remainder written as a copy
        finally:
            self._batch_done()

    def _batch_done(self) -> None:
        self._open_batches -= 1
        if self._open_batches == 0:
            self._idle.set()

    async def _drop_file(self, payload: Payload) -> None:
        """Durable mode: the batch's spool file is done with (delivered, or now in the DLQ)."""
        if payload.file is not None and self.spool is not None:
            self.spool.forget(len(payload.data))
            await asyncio.to_thread(_unlink, payload.file)

    def _delivered(self, lane: Lane, n: int) -> None:
        self.metrics.events_delivered.labels(lane.sink.name).inc(n)
        self.report.delivered_events += n

    def _count_dropped(self) -> None:
        self.report.dropped_events = sum(lane.store.dropped_events for lane in self.lanes)

    async def _spill(self, lane: Lane, payload: Payload, reason: str) -> bool:
        """Write `payload` to the lane's DLQ. False when the DLQ refused it: it is held in memory
        then (`_hold`), and its spool file (durable mode) stays until it is taken."""
        refused = await lane.store.put(payload, reason)
        if refused is None:
            self.report.spilled_events += payload.num_events
            return True
        self._hold(lane, Held(payload, reason, _held_cost(payload), refused))
        return False

    # ------------------------------------------------------------------ held batches (fail closed)

    def _hold(self, lane: Lane, held: Held) -> None:
        """Keep a batch the DLQ refused, its bytes charged to the budget, and offer it again."""
        self.queue.charge(held.cost)
        self.queue.held_reason = DLQ_UNAVAILABLE  # /collect's 503s say why
        lane.held.append(held)
        self._publish_held(lane)
        if len(lane.held) == 1:
            log.error("dlq cannot take a batch the sink did not take: holding it in memory; /collect answers "
                      "503 dlq_unavailable once held batches fill BUFFER_MAX_BYTES", extra={
                          "sink": lane.sink.name, "batch": held.payload.name, "events": held.payload.num_events,
                          "reason": held.refusal, "spill_reason": held.reason, "held_bytes": held.cost,
                          "buffer_bytes": self.queue.held_bytes, "buffer_max_bytes": self.queue.max_bytes})
        if lane.held_task is None or lane.held_task.done():
            lane.held_task = asyncio.create_task(self._offer_held(lane), name=f"held-{lane.sink.name}")

    async def _offer_held(self, lane: Lane) -> None:
        """Offer the oldest held batch to the sink (one attempt), then to the DLQ; the next one at
        once when either took it, else after a capped backoff. Until the queue is empty or an abort."""
        failures = 0
        while lane.held and not self._abort.is_set():
            h = lane.held[0]
            try:
                taken = await self._place(lane, h)
            except Exception:  # never let the loop die with batches in it
                log.exception("held batch could not be offered", extra={"sink": lane.sink.name})
                taken = False
            if taken:
                failures = 0
                continue
            failures += 1
            if await self._abort.sleep(HELD_BACKOFF.delay(failures)):
                return

    async def _place(self, lane: Lane, h: Held) -> bool:
        """One offer of held batch `h`: True when the sink or the DLQ took it (it is released)."""
        if h.reason != "rejected":  # items the sink rejected for good are only for the DLQ
            final = await lane.delivery.run(h.payload, attempts=1)
            if final.next is None:
                return False  # aborted by shutdown
            for items in final.set_aside:
                await self._spill(lane, items, "rejected")
            if final.delivered:
                self._delivered(lane, final.delivered)
            if final.next is Next.DELIVERED:
                log.info("held batch delivered", extra={
                    "sink": lane.sink.name, "batch": h.payload.name, "events": final.delivered, "outcome": "ok",
                    "attempts": final.payload.attempts})
                await self._release(lane, h, drop_file=True)
                return True
            if final.changed:  # partly delivered: what is left stays held
                self.queue.release(h.cost)
                h.payload, h.cost = final.payload, _held_cost(final.payload)
                self.queue.charge(h.cost)
            else:
                h.payload = final.payload  # its attempt count
            h.reason = _SPILL_REASON[final.next]
        refused = await lane.store.put(h.payload, h.reason)
        if refused is not None:
            h.refusal = refused
            return False
        self.report.spilled_events += h.payload.num_events
        await self._release(lane, h, drop_file=True)
        return True

    async def _release(self, lane: Lane, h: Held, drop_file: bool) -> None:
        lane.held.remove(h)
        self.queue.release(h.cost)
        self._publish_held(lane)
        if not any(ln.held for ln in self.lanes):
            self.queue.held_reason = ""
        if drop_file:  # taken by the sink or the DLQ (else given up by the drain)
            if not lane.held:
                log.info("no batch held any more: the sink or the dlq takes them again", extra={"sink": lane.sink.name})
            await self._drop_file(h.payload)

    def _publish_held(self, lane: Lane) -> None:
        m = self.metrics
        m.dlq_unavailable.labels(lane.sink.name).set(1 if lane.held else 0)
        m.held_events.labels(lane.sink.name).set(sum(h.payload.num_events for h in lane.held))

    async def _drain_held(self, deadline: float) -> None:
        """Shutdown: held batches are offered until the deadline; then each gets one last DLQ write,
        and what is still refused is lost — counted and logged, never silent."""
        loop = asyncio.get_running_loop()
        running = {lane.held_task for lane in self.lanes if lane.held_task is not None and not lane.held_task.done()}
        if running:
            _, pending = await asyncio.wait(running, timeout=max(0.0, deadline - loop.time()))
            if pending:
                self.report.aborted = True
                self.abort()
                await asyncio.wait(pending)
        for lane in self.lanes:
            while lane.held:
                h = lane.held[0]
                refused = await lane.store.put(h.payload, h.reason)
                if refused is None:
                    self.report.spilled_events += h.payload.num_events
                    await self._release(lane, h, drop_file=True)
                    continue
                n = h.payload.num_events
                if h.payload.file is not None:  # durable mode: its spool file stays; the next start delivers it
                    log.warning("held batch left in its spool file at shutdown: the next start delivers it", extra={
                        "sink": lane.sink.name, "batch": h.payload.name, "events": n, "reason": refused,
                        "file": h.payload.file})
                else:
                    self.report.lost_events += n
                    self.metrics.dlq_dropped.labels(lane.sink.name, _DROP_REASON.get(refused, "write_error")).inc(n)
                    log.error("held batch lost at shutdown: neither the sink nor the dlq took it", extra={
                        "sink": lane.sink.name, "batch": h.payload.name, "events": n, "reason": refused})
                await self._release(lane, h, drop_file=False)


def _encode_payload(head: Payload, lines: list[bytes], nbytes: int, level: int,
                    observe: Callable[[float], None]) -> Payload:
    """In a compression thread: the batch's lines compressed ~1 MiB at a time (released as they go
    unless the sink keeps them), as `head` with its data."""
    data = encode_lines(lines, nbytes, head.compression, level, head.lines is None)
    observe(len(data))
    return dataclasses.replace(head, data=data)


def _line_size(item: Item) -> int:
    return len(item[1])


def _held_cost(payload: Payload) -> int:
    """The memory a held payload keeps: its compressed data, and its lines when the sink keeps them."""
    return len(payload.data) + (sum(map(len, payload.lines)) if payload.lines else 0)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def dlq_root_for(settings: Settings, worker: int | None) -> str:
    return settings.dlq_dir if worker is None else os.path.join(settings.dlq_dir, f"w{worker}")

