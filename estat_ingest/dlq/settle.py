"""What becomes of a claimed DLQ file after a delivery run (the replayer and `dlq replay` share it).

- delivered             → the file is deleted;
- partly delivered      → the file is rewritten with only what is left (same name, same key);
- rejected for good     → set aside: the sink's own place when it has one (`KeepsRejects`: S3's
                          DLQ_PREFIX), else `<dir>/rejected/`; never replayed automatically;
- retry, outage, abort  → nothing here: the caller gives the claim back.
Items a sink rejected for good inside a batch that was otherwise delivered (OpenSearch mapping
errors) are set aside the same way, as a file of their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, NamedTuple

from estat_ingest.delivery import Final, Next
from estat_ingest.dlq import files
from estat_ingest.dlq.scan import Entry
from estat_ingest.dlq.store import DlqStore
from estat_ingest.sinks.base import KeepsRejects, Payload, Sink

log = logging.getLogger("estat_ingest.dlq")


class Settled(NamedTuple):
    kind: str  # delivered | rewritten | rejected
    where: str = ""  # rejected: where the file went
    set_aside: tuple[tuple[Payload, str], ...] = ()  # items rejected for good, and where they went


async def settle(store: DlqStore, sink: Sink, entry: Entry, cpath: str, final: Final) -> Settled | None:
    """Act on `final` for the claimed file `cpath`. None when the claim was not used (retry,
    outage, abort): the caller gives it back."""
    items = tuple([(p, await set_aside(store, sink, p, "rejected", directory=entry.directory))
                   for p in final.set_aside])
    if final.next is Next.DELIVERED:
        await store.consume(entry, cpath)
        return Settled("delivered", set_aside=items)
    if final.changed:
        await store.rewrite(entry, cpath, final.payload)
        return Settled("rewritten", set_aside=items)
    if final.next is Next.REJECTED:
        where = await reject(store, sink, entry, cpath, final.payload, final.reason or "rejected")
        return Settled("rejected", where, items)
    return None


async def reject(store: DlqStore, sink: Sink, entry: Entry, cpath: str, payload: Payload, reason: str,
                 meta: dict[str, Any] | None = None) -> str:
    """Set a claimed file aside for good, its meta (`meta`, or the one on disk) saying why."""
    if meta is None:
        meta = await asyncio.to_thread(files.read_meta, entry.directory, entry.name)
    meta = dict(meta or {"num_events": payload.num_events})
    meta["attempts"] = payload.attempts
    meta["rejected_reason"] = reason
    await asyncio.to_thread(files.write_meta, entry.directory, entry.name, meta)
    return await set_aside(store, sink, payload, reason, entry=entry, cpath=cpath)


async def set_aside(store: DlqStore, sink: Sink, payload: Payload, reason: str, *, entry: Entry | None = None,
                    cpath: str | None = None, directory: str | None = None) -> str:
    """A batch rejected for good: to the sink's own place if it has one, else to `rejected/`.

    With `entry`/`cpath` the claimed file itself moves; without, `payload` is written there (the
    items of a partial rejection, beside `directory`)."""
    where = await sink.keep_rejected(payload) if isinstance(sink, KeepsRejects) else None
    if where is not None:
        if entry is not None and cpath is not None:
            await store.consume(entry, cpath)
    elif entry is not None and cpath is not None:
        where = await asyncio.to_thread(files.move_aside, cpath, entry.directory, entry.name, files.REJECTED)
        store.gone(entry)
    else:
        d = os.path.join(directory or store.dir, files.REJECTED)
        await asyncio.to_thread(store.write_sync, payload, reason, d)
        where = os.path.join(d, payload.name)
    store.metrics.dlq_rejected.labels(sink.name).inc(payload.num_events)
    log.error("dlq batch rejected by the sink, set aside", extra={
        "sink": sink.name, "file": payload.name, "events": payload.num_events, "reason": reason,
        "moved_to": where})
    return where
