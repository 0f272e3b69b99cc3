"""aiohttp handlers: read the body under the cap, call the plain /collect function, answer."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import HttpVersion11

from estat_ingest.http.collect import Collector
from estat_ingest.http.guard import ConnectionGuard
from estat_ingest.http.policy import (
    BAD_BODY,
    COLLECT_PATHS,
    HEALTH,
    OVERLOADED,
    READ_TIMEOUT,
    Reply,
    metrics_answer,
    ready_reply,
    send_continue,
)
from estat_ingest.metrics import Metrics

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
    limits = collector.limits
    try:
        if not collector.inflight.admit():
            resp = to_response(collector.with_cors(collector.refuse(OVERLOADED), request.headers))
            resp.force_close()
            return resp
        body = b""
        # a body is read whatever the method: a GET event is stored only once its request is complete
        # (a broken body after it makes it a malformed request, and nothing of one is stored)
        if request.method == "POST" or request.body_exists:
            try:
                if request.content.is_eof():
                    # the whole body came with the headers (the common small POST): nothing to
                    # wait for, so no timer to arm (asyncio.timeout cost ~5 µs per request)
                    got = await read_capped(request, limits.body_bytes)
                else:
                    async with asyncio.timeout(limits.body_read_s):
                        got = await read_capped(request, limits.body_bytes)
            except TimeoutError:
                resp = to_response(collector.with_cors(collector.refuse(READ_TIMEOUT), request.headers))
                resp.force_close()  # the rest of the body is never read
                return resp
            except (web.HTTPException, OSError, HttpProcessingError, aiohttp.ClientPayloadError,
                    aiohttp.ClientConnectionError):
                # broken chunked framing or a client gone mid-body: the body is unusable, not too large
                resp = to_response(collector.refuse(BAD_BODY))
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
        if reply.ticket is not None:  # durable: answered once the spool fsync covering it returned
            await asyncio.wait([reply.ticket])
            reply = collector.settle(reply)
        resp = to_response(reply)
        if not collector.ready:
            resp.force_close()  # the draining close (http/policy.py)
        return resp
    finally:
        collector.inflight.leave()


async def health(request: web.Request) -> web.Response:
    served(request)
    return to_response(HEALTH)


async def ready(request: web.Request) -> web.Response:
    served(request)
    collector = request.app[COLLECTOR]
    return to_response(ready_reply(collector.ready and collector.healthy()))


async def metrics(request: web.Request) -> web.Response:
    served(request)
    answer = metrics_answer(request.app[METRICS])  # the worker group's is gathered by the parent
    return to_response(answer if isinstance(answer, Reply) else await answer)


async def expect_continue(request: web.Request) -> None:
    """`Expect` under the edge policy (http/policy.py `send_continue`): `100 Continue` only to
    HTTP/1.1 and never before a 413; any other expectation is ignored, as the fast front does
    (aiohttp's default sends 100 to an over-limit body and answers 417 to other expectations)."""
    limits = request.app[COLLECTOR].limits
    if send_continue(request.headers.get("Expect", ""), request.version >= HttpVersion11, request.content_length,
                     limits):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own bytes start after it (as aiohttp's default)


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
        guard = ConnectionGuard(app[COLLECTOR].limits, app[METRICS])
        app[GUARD] = guard
        app.cleanup_ctx.append(guard.ctx)
    for path in sorted(COLLECT_PATHS):  # any method: Collector.handle answers 405 itself
        app.router.add_route("*", path, collect, expect_handler=expect_continue)
    app.router.add_get("/health", health, expect_handler=expect_continue)
    app.router.add_get("/ready", ready, expect_handler=expect_continue)
    app.router.add_get("/metrics", metrics, expect_handler=expect_continue)
