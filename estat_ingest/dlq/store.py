"""DLQ store: one directory per sink under DLQ_DIR.

Invariants
- A DLQ entry is the v1 pair `<name>` (the encoded batch, byte-identical to what the sink would
  receive) + `<name>.meta.json` (`num_events` and, new, sink, key, created_at, checksum, attempts).
- Files are written to a hidden temp name, fsynced, renamed, and the directory is fsynced: after a
  crash an entry is complete or absent; temp files left behind are removed at start.
- Nothing is deleted without delivery except by a counted, logged policy (ttl, capacity, corrupt).
- All file work is blocking and runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

import orjson

from estat_ingest.fsutil import fsync_dir, write_tmp
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.encoder import checksum
from estat_ingest.sinks.base import Payload

log = logging.getLogger("estat_ingest.dlq")

META_SUFFIX = ".meta.json"


def is_data_name(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(META_SUFFIX) and not name.endswith(".claim")


@dataclass(slots=True)
class DirTotals:
    files: int = 0
    bytes: int = 0


class DlqStore:
    def __init__(self, root: str, sink: str, metrics: Metrics) -> None:
        self.root = root
        self.sink = sink
        self.dir = os.path.join(root, sink)
        self.metrics = metrics
        self.totals = DirTotals()
        self._lock = asyncio.Lock()

    # ---------------------------------------------------------------- start-up

    async def start(self) -> None:
        self.totals = await asyncio.to_thread(self._start_sync)
        self._publish()

    def _start_sync(self) -> DirTotals:
        os.makedirs(self.dir, exist_ok=True)
        totals = DirTotals()
        with os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    try:  # a write interrupted by a crash: never renamed, never visible
                        os.unlink(entry.path)
                    except OSError:
                        pass
                    continue
                if is_data_name(entry.name) and entry.is_file(follow_symlinks=False):
                    totals.files += 1
                    totals.bytes += entry.stat(follow_symlinks=False).st_size
        return totals

    def _publish(self) -> None:
        self.metrics.dlq_files.labels(self.sink).set(self.totals.files)
        self.metrics.dlq_bytes.labels(self.sink).set(self.totals.bytes)

    # ---------------------------------------------------------------- write side

    def meta_of(self, payload: Payload, reason: str) -> dict[str, object]:
        meta: dict[str, object] = {
            "num_events": payload.num_events,
            "sink": self.sink,
            "key": f"{payload.partition}/{payload.name}",
            "partition": payload.partition,
            "first_ts": payload.first_ts,
            "created_at": time.time(),
            "compression": payload.compression,
            "checksum": checksum(payload.data),
            "attempts": payload.attempts,
            "reason": reason,
        }
        meta.update(payload.meta)
        return meta

    def write_sync(self, payload: Payload, reason: str, directory: str | None = None) -> None:
        d = directory or self.dir
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, payload.name)
        meta = orjson.dumps(self.meta_of(payload, reason))
        tmp_data = write_tmp(path, payload.data)
        tmp_meta = write_tmp(path + META_SUFFIX, meta)
        try:
            os.replace(tmp_data, path)
            os.replace(tmp_meta, path + META_SUFFIX)
        except BaseException:
            for t in (tmp_data, tmp_meta):
                try:
                    os.unlink(t)
                except OSError:
                    pass
            raise
        fsync_dir(d)

    async def write(self, payload: Payload, reason: str) -> bool:
        """Persist an undeliverable payload. False (counted, logged) if the disk refused it."""
        try:
            await asyncio.to_thread(self.write_sync, payload, reason)
        except OSError as err:
            self.metrics.dlq_write_errors.labels(self.sink).inc()
            self.metrics.dlq_dropped.labels(self.sink, "write_error").inc(payload.num_events)
            log.error("dlq write failed: events lost", extra={
                "sink": self.sink, "file": payload.name, "events": payload.num_events,
                "reason": "write_error", "error": str(err)})
            return False
        self.totals.files += 1
        self.totals.bytes += len(payload.data)
        self._publish()
        self.metrics.dlq_enqueued.labels(self.sink).inc(payload.num_events)
        self.metrics.dlq_writes.labels(self.sink, reason).inc()
        log.warning("batch written to dlq", extra={
            "sink": self.sink, "file": payload.name, "events": payload.num_events,
            "bytes": len(payload.data), "reason": reason})
        return True

    def forget(self, size: int) -> None:
        """A data file of `size` bytes left the directory (delivered, expired, evicted)."""
        self.totals.files = max(0, self.totals.files - 1)
        self.totals.bytes = max(0, self.totals.bytes - size)
        self._publish()
