"""The METRICS_ADDR listener: `/metrics`, `/health` and `/ready` on a port of their own, so they
need not be reachable where clients POST /collect (the public port then answers /metrics 404).

One process serves it from `serve()`, up from before the pipeline starts until after it drained
(so a scrape sees the start-up and the whole drain, with `/ready` 503); with `serve --workers N`
the parent serves it, with the whole group's metrics (groupmetrics.py). It is aiohttp's server
(GET and HEAD; 404 and 405 from its router), imported only when METRICS_ADDR is set.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from estat_ingest.http.policy import HEALTH, Reply, ready_reply

HANDLER_GRACE_S = 1.0  # a scrape still running at close


class MetricsListener:
    """`scrape`: the /metrics answer; `ready`: whether /ready answers 200."""

    def __init__(self, scrape: Callable[[], Awaitable[Reply]], ready: Callable[[], Awaitable[bool]]) -> None:
        self.scrape = scrape
        self.ready = ready
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=HANDLER_GRACE_S)
        self.site: web.SockSite | None = None

    async def start(self, sock: socket.socket) -> None:
        await self.runner.setup()
        self.site = web.SockSite(self.runner, sock)
        await self.site.start()

    async def close(self) -> None:
        await self.runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return _response(await self.scrape())

    async def _health(self, request: web.Request) -> web.Response:
        return _response(HEALTH)

    async def _ready(self, request: web.Request) -> web.Response:
        return _response(ready_reply(await self.ready()))


def _response(reply: Reply) -> web.Response:
    return web.Response(status=reply.status, headers=reply.headers, body=reply.body)
