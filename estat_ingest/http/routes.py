"""aiohttp handlers: read the body under the cap, call the plain /collect function, answer."""

from __future__ import annotations

from aiohttp import web

from estat_ingest.http.collect import Collector, Reply
from estat_ingest.metrics import CONTENT_TYPE, Metrics

COLLECTOR: web.AppKey[Collector] = web.AppKey("collector", Collector)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
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
    collector = request.app[COLLECTOR]
    collector.inflight.enter()
    try:
        body = b""
        if request.method == "POST":
            got = await read_capped(request, collector.settings.max_body_bytes)
            if got is None:
                resp = to_response(collector.too_large())
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


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def ready(request: web.Request) -> web.Response:
    if request.app[COLLECTOR].ready:
        return web.Response(text="ready")
    return web.Response(status=503, text="not ready")


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/collect", collect)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
