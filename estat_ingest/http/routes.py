"""aiohttp handlers: read the body under the cap, call the plain /collect function, answer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from estat_ingest.http.collect import LOG_EVERY_S, PIXEL_PATHS, Collector, Reply
from estat_ingest.http.guard import ConnectionGuard
from estat_ingest.log import RateLimitedLog
from estat_ingest.metrics import CONTENT_TYPE, Metrics

COLLECTOR: web.AppKey[Collector] = web.AppKey("collector", Collector)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
GUARD: web.AppKey[ConnectionGuard] = web.AppKey("connection_guard", ConnectionGuard)
READ_CHUNK = 64 * 1024


async def read_capped(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is over `limit` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    chunks: list[bytes] = []
    total = 0
    content = request.content
    while True:
        chunk = await content.read(READ_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def to_response(reply: Reply) -> web.Response:
    return web.Response(status=reply.status, headers=reply.headers, body=reply.body)


async def collect(request: web.Request) -> web.StreamResponse:
    served(request)
    collector = request.app[COLLECTOR]
    settings = collector.settings
    collector.inflight.enter()
    try:
        if collector.inflight.count > settings.max_in_flight:
            reply = collector.reject(503, "overloaded", "too many requests in flight, retry later",
                                     {"Retry-After": "1"})
            resp = to_response(collector.with_cors(reply, request.headers))
            resp.force_close()
            return resp
        body = b""
        if request.method == "POST":
            try:
                if request.content.is_eof():
                    # the whole body came with the headers (the common small POST): nothing to
                    # wait for, so no timer to arm (asyncio.timeout cost ~5 µs per request)
                    got = await read_capped(request, settings.max_body_bytes)
                else:
                    async with asyncio.timeout(settings.request_read_timeout_s):
                        got = await read_capped(request, settings.max_body_bytes)
            except TimeoutError:
                reply = collector.reject(408, "read_timeout", "request body not received in time")
                resp = to_response(collector.with_cors(reply, request.headers))
                resp.force_close()  # the rest of the body is never read
                return resp
            except (web.HTTPException, OSError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                # broken chunked framing, client gone mid-body (v1 called these 413)
                reply = collector.reject(400, "bad_body", "request body could not be read")
                resp = to_response(reply)
                resp.force_close()
                return resp
            if got is None:
                resp = to_response(collector.with_cors(collector.too_large(), request.headers))
                resp.force_close()  # the rest of the body is never read
                return resp
            body = got
        reply = collector.handle(
            request.method,
            request.path,
            request.rel_url.raw_query_string,
            request.headers,
            body,
            request.remote,
        )
        resp = to_response(reply)
        if not collector.ready:
            resp.force_close()  # draining: move the client to another instance
        return resp
    finally:
        collector.inflight.leave()


class ProtocolErrors:
    """Requests refused before /collect runs (malformed HTTP, header limits): counted, and logged
    as one line at most once per reason per `every` seconds, for both HTTP fronts.

    `http_requests_rejected_total{reason}` moves for each one (bad_http, header_too_large,
    server_error); the log line has no traceback (an attacker could fill the disk), except for a
    server_error, which is our bug.
    """

    def __init__(self, metrics: Metrics, every: float = LOG_EVERY_S) -> None:
        self.logger = logging.getLogger("estat_ingest.http.protocol")
        self.metrics = metrics
        self.limit = RateLimitedLog(every)

    def note(self, reason: str, detail: str, exc: BaseException | None = None, msg: object = "",
             args: tuple[Any, ...] = ()) -> None:
        self.metrics.rejected.labels(reason).inc()
        suppressed = self.limit.allow(reason)
        if suppressed is None:
            return
        extra = {"reason": reason, "suppressed": suppressed, "detail": detail.replace("\n", " ")[:200]}
        if reason == "server_error":
            self.logger.error(msg or "request failed", *args, exc_info=exc if exc is not None else True, extra=extra)
        else:
            self.logger.warning("malformed request rejected", extra=extra)


async def health(request: web.Request) -> web.Response:
    served(request)
    return web.Response(text="ok")


async def ready(request: web.Request) -> web.Response:
    served(request)
    if request.app[COLLECTOR].ready:
        return web.Response(text="ready")
    return web.Response(status=503, text="not ready")


async def metrics(request: web.Request) -> web.Response:
    served(request)
    body = request.app[METRICS].render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


def served(request: web.Request) -> None:
    """A request reached a handler: its connection met the header-read deadline."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.served(request.protocol)


def build_app(collector: Collector, metrics: Metrics) -> web.Application:
    """An aiohttp application with these routes; the caller owns the pipeline behind `collector`."""
    app = web.Application()
    app[COLLECTOR] = collector
    app[METRICS] = metrics
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    if COLLECTOR in app and METRICS in app:
        guard = ConnectionGuard(app[COLLECTOR].settings, app[METRICS])
        app[GUARD] = guard
        app.cleanup_ctx.append(guard.ctx)
    app.router.add_route("*", "/collect", collect)
    for path in sorted(PIXEL_PATHS):
        app.router.add_route("*", path, collect)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
