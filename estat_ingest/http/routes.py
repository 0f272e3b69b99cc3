"""aiohttp handlers: read the body under the cap, call the plain /collect function, answer."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

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


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The `logger` aiohttp's request handler uses for what happens before /collect runs.

    A malformed request (bad request line, smuggling attempt, header over MAX_HEADER_BYTES or
    MAX_HEADERS, non-HTTP bytes) is answered 400 by aiohttp's parser, which would log a full
    traceback per request. Here each one goes to `ProtocolErrors` (counted, rate-limited, no
    traceback unless it is a server_error).
    """

    def __init__(self, metrics: Metrics, every: float = LOG_EVERY_S) -> None:
        super().__init__(logging.getLogger("estat_ingest.http.protocol"), {})
        self.errors = ProtocolErrors(metrics, every)

    def _note(self, msg: object, args: tuple[Any, ...], exc: object) -> None:
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "headers" in str(exc).lower()):
            reason = "header_too_large"
        elif isinstance(exc, HttpProcessingError):
            reason = "bad_http"
        else:
            reason = "server_error"
        self.errors.note(reason, str(exc) if exc is not None else "",
                         exc if isinstance(exc, BaseException) else None, msg, args)

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        self._note(msg, args, exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1])

    def error(self, msg: object, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, BaseException) or exc_info:
            self.exception(msg, *args, exc_info=exc_info)
        else:
            self.logger.error(msg, *args, **kw)

    def debug(self, msg: object, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):  # non-HTTP bytes on the first request
            self._note(msg, args, exc_info)
        else:
            self.logger.debug(msg, *args, exc_info=exc_info, **kw)


def server_kwargs(app: web.Application) -> dict[str, Any]:
    """aiohttp request-handler limits for AppRunner/TestServer (the parser runs before /collect).

    auto_decompress is off: /collect decodes Content-Encoding itself under MAX_BODY_SIZE
    (aiohttp would inflate a bomb in full). The request line must hold a GET payload of
    MAX_BODY_SIZE (the query string), so an over-size GET gets our 413, not the parser's 400.
    keepalive_timeout is above the ALB's 60 s idle timeout; aiohttp also closes a connection whose
    request headers are still incomplete when it fires (slowloris bound). Parser errors go to
    ProtocolLog (counted, rate-limited).
    """
    settings = app[COLLECTOR].settings
    return {
        "auto_decompress": False,
        "max_line_size": max(8190, settings.max_body_bytes + 4096),
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "keepalive_timeout": 75.0,
        # after a 408/413 the unread rest of a body is drained (so the client can read the answer
        # instead of a reset) for at most this long, then the connection is closed; aiohttp's
        # default of 10 s would let a trickling client hold it 10 s more
        "lingering_time": 2.0,
        "logger": ProtocolLog(app[METRICS]),
    }


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
