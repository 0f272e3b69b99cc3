"""A lean HTTP/1.1 front: asyncio.Protocol + httptools, calling the plain /collect function.

Why: the profile of `estat-ingest serve` under load (docs/tuning.md) shows aiohttp's request
machinery (Request/Response objects, the handler task, StreamReader, header multidicts, response
serialisation) taking most of the loop, and a bare aiohttp handler that does nothing is already
≈ 24 µs per request. `Collector.handle` is synchronous and independent of aiohttp (DESIGN.md §1),
so a front only has to parse, call it, and write the reply: no task per request, no awaits.

Not wired into `serve()`: `python -m estat_ingest.fastfront` runs it with the same pipeline and
shutdown order, for benchmarks and evaluation; selecting it from `serve()` is a one-line switch for
the owner of app.py (e.g. `HTTP_FRONT=fast`).

What it keeps from the aiohttp front: routes /collect (+ pixel paths), /health, /ready, /metrics,
404 otherwise; 413 from Content-Length before reading, or as soon as a body passes the cap (and the
connection is closed, the rest is never read); 400 + close for malformed HTTP (counted as
`http_requests_rejected_total{reason="bad_http"}`) and 431 for headers over MAX_HEADER_BYTES /
MAX_HEADERS; 408 + close for a body not received within REQUEST_READ_TIMEOUT; keep-alive with a 75 s
idle timeout (above an ALB's 60 s); `Expect: 100-continue`; pipelined requests answered in order;
`Connection: close` while draining. Timeouts are checked by one sweep per second, not a timer per
request.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

try:
    import httptools
except ImportError:  # not a declared dependency until this front is adopted (docs/tuning.md)
    httptools = None  # type: ignore[assignment]

from estat_ingest.config import Settings
from estat_ingest.http.collect import OK_REPLY, PIXEL_PATHS, Collector, Reply
from estat_ingest.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("estat_ingest.fastfront")

KEEPALIVE_S = 75.0
SWEEP_S = 1.0
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
           415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
COLLECT_PATHS = frozenset({"/collect", *PIXEL_PATHS})


class _Date:
    """The Date header, formatted once per second."""

    def __init__(self) -> None:
        self._sec = -1
        self.value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._sec:
            self._sec = now
            self.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self.value


def render(status: int, headers: Mapping[str, str], body: bytes, date: bytes, close: bool) -> bytes:
    items = headers.items()
    out = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode(),
           b"Date: ", date, b"\r\nServer: estat-ingest\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
    has_type = False
    for k, v in items:
        if k.lower() == "content-length":
            continue
        has_type = has_type or k.lower() == "content-type"
        out.append(f"{k}: {v}\r\n".encode("latin-1", "replace"))
    if body and not has_type:
        out.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)


class Front:
    """The listening side: shared state of every connection, the sweeper, start/stop."""

    def __init__(self, settings: Settings, collector: Collector, metrics: Metrics) -> None:
        if httptools is None:
            raise RuntimeError("the fast HTTP front needs httptools: pip install httptools")
        self.settings = settings
        self.collector = collector
        self.metrics = metrics
        self.date = _Date()
        self.conns: set[HttpConn] = set()
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set while stopping, when no request is half-read
        self._ok_cache: tuple[bytes, bytes, bytes] = (b"", b"", b"")  # (date, keep-alive, close)
        self.max_url = max(8190, settings.max_body_bytes + 4096)

    def ok_bytes(self, close: bool) -> bytes:
        """The 200 reply, re-rendered only when the Date second changes."""
        date = self.date.get()
        cache = self._ok_cache
        if cache[0] is not date:
            cache = self._ok_cache = (date, render(200, OK_REPLY.headers, b"", date, False),
                                      render(200, OK_REPLY.headers, b"", date, True))
        return cache[2] if close else cache[1]

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: HttpConn(self), sock=sock, backlog=1024)
        self._sweeper = asyncio.create_task(self._sweep(), name="fastfront-sweep")

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_S)
            now = loop.time()
            for conn in list(self.conns):
                conn.check_timeouts(now)

    def busy(self) -> int:
        return sum(1 for c in self.conns if c.in_request)

    def request_done(self) -> None:
        """While stopping: wake `stop` once no connection is in the middle of a request."""
        if self._idle is not None and not self.busy():
            self._idle.set()

    async def stop(self, grace_s: float) -> None:
        """Stop listening; close idle connections; give half-received requests `grace_s`."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            if not conn.in_request:
                conn.close()
        self._idle = asyncio.Event()
        self.request_done()
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("requests still half-received after the grace period", extra={"requests": self.busy()})
        for conn in list(self.conns):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


class HttpConn(asyncio.Protocol):
    __slots__ = ("body", "body_size", "front", "header_bytes", "headers", "in_request", "last_active",
                 "parser", "paused", "peer", "reject", "started", "transport", "url")

    def __init__(self, front: Front) -> None:
        self.front = front
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.in_request = False
        self.reject: tuple[int, str, str] | None = None  # answer without reading further
        self.started = 0.0
        self.last_active = 0.0
        self.paused = False

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else None
        self.last_active = asyncio.get_running_loop().time()
        self.front.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.conns.discard(self)
        self.transport = None
        self.in_request = False
        if self.front._idle is not None:
            self.front.request_done()

    def pause_writing(self) -> None:  # the client does not read its answers: stop reading requests
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_active = asyncio.get_running_loop().time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "bad_http", "protocol upgrades are not supported")
        except httptools.HttpParserError as err:
            if self.reject is not None:
                return  # we stopped the parser on purpose (413 / 431 already answered)
            self._fail(400, "bad_http", f"malformed request: {err}"[:200])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def check_timeouts(self, now: float) -> None:
        s = self.front.settings
        if self.in_request and now - self.started > s.request_read_timeout_s:
            self._fail(408, "read_timeout", "request not received in time")
        elif not self.in_request and now - self.last_active > KEEPALIVE_S:
            self.close()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.in_request = True
        self.started = asyncio.get_running_loop().time()
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.front.max_url:
            self._stop(413 if b"?" in self.url else 400, "too_large", "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        s = self.front.settings
        self.header_bytes += len(name) + len(value)
        if len(name) + len(value) > s.max_header_bytes or len(self.headers) >= s.max_headers:
            self._stop(431, "header_too_large", "request headers too large")
            return
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.reject is not None:
            return
        limit = self.front.settings.max_body_bytes
        for k, v in self.headers:
            lk = k.lower()
            if lk == "content-length":
                if v.strip().isdigit() and int(v) > limit:
                    self._stop(413, "too_large", "")
                    return
            elif lk == "expect" and v.strip().lower() == "100-continue" and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        if self.reject is not None:
            return
        self.body_size += len(chunk)
        if self.body_size > self.front.settings.max_body_bytes:
            self._stop(413, "too_large", "")
            return
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.in_request = False
        if self.reject is not None or self.transport is None:
            return
        front = self.front
        collector = front.collector
        method = self.parser.get_method().decode("ascii", "replace")
        raw = self.url
        q = raw.find(b"?")
        path = (raw if q < 0 else raw[:q]).decode("latin-1")
        query = "" if q < 0 else raw[q + 1:].decode("latin-1")
        keep = self.parser.should_keep_alive() and collector.ready
        if path in COLLECT_PATHS:
            headers = CIMultiDictProxy(CIMultiDict(self.headers))
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            try:
                reply = collector.handle(method, path, query, headers, body, self.peer)
            except Exception:  # a bug must not take the connection loop down
                log.exception("collect failed")
                collector.metrics.rejected.labels("server_error").inc()
                reply = Reply(500, {}, b"internal error\n")
            if reply is OK_REPLY:
                self.transport.write(front.ok_bytes(not keep))
            else:
                self.transport.write(render(reply.status, reply.headers, reply.body, front.date.get(), not keep))
        elif path == "/health":
            self._reply(200, b"ok", keep)
        elif path == "/ready":
            self._reply(200, b"ready", keep) if collector.ready else self._reply(503, b"not ready", keep)
        elif path == "/metrics":
            self._reply(200, front.metrics.render(), keep, CONTENT_TYPE)
        else:
            self._reply(404, b"not found\n", keep)
        if not keep:
            self.transport.close()
        if front._idle is not None:
            front.request_done()

    # ------------------------------------------------------------------ replies

    def _reply(self, status: int, body: bytes, keep: bool, ctype: str = "text/plain; charset=utf-8") -> None:
        if self.transport is not None:
            self.transport.write(render(status, {"Content-Type": ctype}, body, self.front.date.get(), not keep))

    def _stop(self, status: int, reason: str, message: str) -> None:
        """Answer now and close: the rest of this request is never read."""
        if self.reject is not None:
            return
        self.reject = (status, reason, message)
        collector = self.front.collector
        reply = collector.too_large() if status == 413 else collector.reject(status, reason, message)
        if self.transport is not None:
            self.transport.write(render(reply.status, reply.headers, reply.body, self.front.date.get(), True))
            self.transport.close()
        self.in_request = False

    def _fail(self, status: int, reason: str, message: str) -> None:
        self._stop(status, reason, message)


# ---------------------------------------------------------------------------------- serving


async def serve_fast(settings: Settings, *, sock: socket.socket | None = None,
                     shutdown_trigger: asyncio.Event | None = None, install_signals: bool = True) -> int:
    """`app.serve` with this front: same pipeline, same shutdown order (DESIGN.md §7)."""
    from estat_ingest.app import Lifecycle, make_socket
    from estat_ingest.pipeline.engine import Pipeline
    from estat_ingest.sinks import build_sink

    metrics = Metrics()
    lifecycle = Lifecycle(settings)
    pipeline = Pipeline(settings, metrics, [build_sink(n, settings) for n in settings.sinks])
    collector = Collector(settings, pipeline.queue, metrics)
    front = Front(settings, collector, metrics)
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if lifecycle.started_at is None:
            log.info("signal received: draining", extra={"signal": name})
            lifecycle.begin()
        else:
            pipeline.abort()

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
    await pipeline.start()
    collector.accepting = True
    await front.start(sock or make_socket(settings.http_host, settings.http_port))
    collector.ready = True
    metrics.ready.set(1)
    log.info("listening", extra={"addr": f"{settings.http_host}:{settings.http_port}", "front": "fast"})
    await lifecycle.wait_for_stop(shutdown_trigger)
    collector.ready = False
    metrics.ready.set(0)
    await front.stop(lifecycle.http_grace())
    collector.accepting = False
    report = await pipeline.drain(lifecycle.delivery_budget())
    log.info("shutdown complete", extra={"delivered_events": report.delivered_events,
                                         "spilled_events": report.spilled_events,
                                         "lost_events": report.lost_events})
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def main() -> int:
    from estat_ingest import log as logsetup
    from estat_ingest.cli import _load, _run

    settings = _load()
    logsetup.setup(settings.log_level, settings.log_format, service="estat-ingest", instance=settings.instance_id)
    return _run(serve_fast(settings))


if __name__ == "__main__":
    raise SystemExit(main())
