"""In-package fake sink (httpx's MockTransport idea): records payloads; scriptable outcomes."""

from __future__ import annotations

import asyncio
from collections import deque

from estat_ingest.config import Settings
from estat_ingest.formats.codec import decompress
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import OK, Payload, Result, Sink, SinkSpec


class MemorySink(Sink):
    def __init__(self, settings: Settings | None = None, metrics: Metrics | None = None, attempts: int = 3, *,
                 gated: bool = False, name: str = "memory") -> None:
        self.spec = SinkSpec(name=name, attempts=attempts, timeout_s=60.0 if gated else 5.0)
        # gated: every send waits until `gate` is set (a stuck sink that recovers on cue)
        self.gate: asyncio.Event | None = asyncio.Event() if gated else None
        self.delivered: list[Payload] = []
        self.calls: list[Payload] = []
        self.script: deque[Result] = deque()  # outcomes to return before answering OK

    async def send(self, payload: Payload) -> Result:
        if self.gate is not None:
            await self.gate.wait()
        self.calls.append(payload)
        if self.script:
            return self.script.popleft()
        self.delivered.append(payload)
        return OK

    def lines(self) -> list[bytes]:
        out: list[bytes] = []
        for p in self.delivered:
            out.extend(decompress(p.data, p.compression).splitlines())
        return out
