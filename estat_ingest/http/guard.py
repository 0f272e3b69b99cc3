"""Connection guard: a connection must complete its first request's headers in HEADER_READ_TIMEOUT.

aiohttp has no header-read deadline of its own: a connection that trickles header bytes is only
closed by the keep-alive timer (75 s, armed at connect), so a slowloris client could hold each
socket that long. Every `interval` seconds the guard looks at the server's open connections
(`Server.connections`) and force-closes those that have been open longer than the deadline
without a request reaching a handler; each one moves
`http_requests_rejected_total{reason="header_timeout"}`. Connections that have served a request
are left to the keep-alive timer, which also bounds a later request's headers (75 s). The sweep is
O(open connections) once per interval, never per request; the request side only adds the
connection to a set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from estat_ingest.http.policy import Limits
from estat_ingest.metrics import Metrics


class ConnectionGuard:
    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.header_timeout = limits.header_read_s
        self.interval = min(1.0, self.header_timeout / 4)
        self.metrics = metrics
        self.server: web.Server | None = None
        self._first_seen: dict[Any, float] = {}
        self._served: set[Any] = set()  # RequestHandler has __slots__ (no weakrefs): pruned by sweep

    def attach(self, server: web.Server | None) -> None:
        """Called by serve() once the runner has built its server."""
        self.server = server

    def served(self, protocol: Any) -> None:
        if self.server is not None:  # unattached (in-process test servers): nothing to sweep
            self._served.add(protocol)

    def sweep(self, now: float) -> int:
        if self.server is None:
            return 0
        conns = self.server.connections
        live = set(conns)
        for h in [h for h in self._first_seen if h not in live]:
            del self._first_seen[h]
        self._served &= live
        closed = 0
        for h in conns:
            first = self._first_seen.setdefault(h, now)
            if now - first >= self.header_timeout and h not in self._served:
                h.force_close()
                closed += 1
        if closed:
            self.metrics.rejected.labels("header_timeout").inc(closed)
        return closed

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep(time.monotonic())

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx entry: the sweeper task lives exactly as long as the app."""
        task = asyncio.create_task(self.run(), name="connection-guard")
        yield
        task.cancel()
        await asyncio.wait([task])  # finished, its CancelledError not re-raised into cleanup
