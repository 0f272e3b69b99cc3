"""File sink: the S3 key layout under FILE_SINK_DIR, written atomically (temp name, fsync, rename).

The embedded default: with no RAW_BUCKET and no SINKS the server writes ./data/raw/dt=…/hr=…/*.gz.
"""

from __future__ import annotations

import asyncio
import os

from estat_ingest.config import Settings
from estat_ingest.fsutil import atomic_write
from estat_ingest.metrics import Metrics
from estat_ingest.preflight import probe_dir
from estat_ingest.sinks.base import OK, Outcome, Payload, Probe, Result, Sink, SinkSpec


class FileSink(Sink):
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.spec = SinkSpec(name="file", attempts=3, timeout_s=30.0)
        self.root = os.path.abspath(settings.file_sink_dir)
        self.prefix = settings.raw_prefix

    def path_of(self, payload: Payload) -> str:
        return os.path.join(self.root, self.prefix, payload.partition, payload.name)

    def target_of(self, payload: Payload) -> str:
        return self.path_of(payload)

    async def probe(self) -> Probe:
        """The directory partitions are created in (FILE_SINK_DIR/RAW_PREFIX): created if missing,
        then a file created, written, fsynced and deleted in it — the start-up probe, one level down."""
        directory = os.path.join(self.root, self.prefix)
        why = await asyncio.to_thread(probe_dir, directory)
        if why is not None:
            return Probe("", (f"FILE_SINK_DIR={self.root!r} is not usable: {why}",))
        return Probe(f"wrote, fsynced and deleted a file in {directory}")

    async def start(self) -> None:
        await asyncio.to_thread(os.makedirs, self.root, exist_ok=True)

    async def send(self, payload: Payload) -> Result:
        try:
            await asyncio.to_thread(atomic_write, self.path_of(payload), payload.data)
        except OSError as err:
            return Result(Outcome.RETRY, "io_error" if err.errno is None else f"errno_{err.errno}"[:20],
                          error=str(err)[:300])
        return OK
