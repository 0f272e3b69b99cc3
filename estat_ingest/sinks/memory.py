"""In-package fake sink (httpx's MockTransport idea): records payloads; scriptable outcomes."""

from __future__ import annotations

from collections import deque

from estat_ingest.config import Settings
from estat_ingest.pipeline.encoder import decompress
from estat_ingest.sinks.base import OK, Payload, Result, Sink


class MemorySink(Sink):
    name = "memory"

    def __init__(self, settings: Settings | None = None, attempts: int = 3) -> None:
        self.attempts = attempts
        self.timeout_s = 5.0
        self.delivered: list[Payload] = []
        self.calls: list[Payload] = []
        self.script: deque[Result] = deque()  # outcomes to return before answering OK

    async def send(self, payload: Payload) -> Result:
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
