"""The httptools HTTP/1.1 front (`HTTP_FRONT=fast`): asyncio.Protocol + httptools, calling the
plain /collect function.

Why: the profile of `estat-ingest serve` under load (docs/tuning.md) shows aiohttp's request
machinery (Request/Response objects, the handler task, StreamReader, header multidicts, response
serialisation) taking most of the loop. `Collector.handle` is synchronous and independent of
aiohttp (DESIGN.md §1), so this front only parses (httptools, the llhttp parser uvicorn uses),
calls it and writes the reply: no task per request, no awaits, one sweep per second for every
timer instead of a timer per request.

`app.serve()` runs it when `settings.http_front == "fast"` (`HTTP_FRONT`, the default), with the
same pipeline and the same shutdown path as the aiohttp front (`Front` has the three methods
`app.HttpFront` asks for).

What it does, with the aiohttp front's behaviour for each (docs/security.md):
- routes: `/collect` and the pixel paths (any method; `Collector.handle` answers 405 itself),
  `/health`, `/ready`, `/metrics` (GET and HEAD, else 405 with `Allow`), 404 otherwise; a HEAD
  answer has the headers of the GET answer and no body;
- `MAX_IN_FLIGHT`: a /collect request counts from its complete headers until it is answered
  (`Collector.inflight`, which shutdown waits for); past the cap, 503 `overloaded` with
  `Retry-After: 1`, connection closed, the body never read;
- 413 from Content-Length before any body byte is read, or as soon as a (chunked) body passes
  MAX_BODY_SIZE; a request line over max(8190, MAX_BODY_SIZE + 4096) bytes is 413 when it has a
  query (the GET payload), 431 otherwise;
- header limits: a header line over MAX_HEADER_BYTES or more than MAX_HEADERS headers is 431
  (`header_too_large`; the aiohttp front answers 400). httptools accumulates a header without a
  bound until it is complete, so the bytes of a header section still in progress are bounded too;
- malformed HTTP (llhttp in strict mode: smuggling shapes, bad framing, non-HTTP bytes, raw
  non-ASCII bytes in the request target, an HTTP/1.1 request without Host, an upgrade before
  the request is complete) is 400 `bad_http`; both counted in `http_requests_rejected_total{reason}` and logged at most
  once per reason per 10 s (`routes.ProtocolErrors`, shared with the aiohttp front);
- HEADER_READ_TIMEOUT: a connection's first request must complete its headers within it from
  the connection's start, a later request from its first byte; else the connection is closed
  without an answer (`header_timeout`); REQUEST_READ_TIMEOUT: a body not complete within it
  from the end of the headers is 408 (`read_timeout`), connection closed;
- after a refusal the connection stops parsing, sends the answer, half-closes and discards what
  the client still sends for at most LINGER_S (so the client reads the answer instead of a reset),
  then closes; keep-alive idle timeout 75 s (above an ALB's 60 s);
- `Expect: 100-continue`, chunked bodies, pipelined requests answered in order, `Connection:
  close` on every answer once the server is draining, header values decoded as UTF-8 with
  surrogate escapes (as aiohttp does, so non-UTF-8 bytes are stored as U+FFFD by `/collect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Mapping
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from estat_ingest.config import Settings
from estat_ingest.http.collect import OK_REPLY, PIXEL_PATHS, Collector, Reply
from estat_ingest.http.routes import ProtocolErrors
from estat_ingest.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("estat_ingest.fastfront")
_now = time.monotonic  # every timer of this front (uvloop's loop.time() has another origin)

KEEPALIVE_S = 75.0
LINGER_S = 2.0  # as the aiohttp front's lingering_time
CLOSE_FLUSH_S = 1.0  # at shutdown, closing connections may flush their last answers this long
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
           415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
COLLECT_PATHS = frozenset({"/collect", *PIXEL_PATHS})
PLAIN_PATHS = frozenset({"/health", "/ready", "/metrics"})
TEXT = "text/plain; charset=utf-8"

IDLE, HEAD, BODY = 0, 1, 2  # where a connection is in its current request


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


def render(status: int, headers: Mapping[str, str], body: bytes, date: bytes, close: bool,
           head: bool = False) -> bytes:
    """One HTTP/1.1 response; `head`: the headers of this answer without its body."""
    out = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode(),
           b"Date: ", date, b"\r\nServer: estat-ingest\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
    has_type = False
    for k, v in headers.items():
        lk = k.lower()
        if lk == "content-length":
            continue
        has_type = has_type or lk == "content-type"
        out.append(f"{k}: {v}\r\n".encode("latin-1", "replace"))
    if body and not has_type:
        out.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    if close:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    if not head:
        out.append(body)
    return b"".join(out)


class _Stop(Exception):
    """Raised from a parser callback once the connection has answered and stops reading."""


class Front:
    """The listening side: shared state of every connection, the sweeper, start/stop."""

    def __init__(self, settings: Settings, collector: Collector, metrics: Metrics) -> None:
        self.settings = settings
        self.collector = collector
        self.metrics = metrics
        self.protocol_errors = ProtocolErrors(metrics)
        self.date = _Date()
        self.conns: set[HttpConn] = set()
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._all_closed: asyncio.Event | None = None  # set by the last connection_lost while closing
        self._ok_cache: tuple[bytes, bytes, bytes] = (b"", b"", b"")  # (date, keep-alive, close)
        s = settings
        self.max_url = max(8190, s.max_body_bytes + 4096)  # a GET payload of MAX_BODY_SIZE fits
        # Bounds on a header section still arriving (httptools keeps a header until it is
        # complete): the line in progress, and the whole section. The estimate may include the
        # tail of the previous pipelined request (at most one body), hence + max_body_bytes.
        self.line_cap = max(self.max_url, s.max_header_bytes) + s.max_body_bytes + 64
        self.head_cap = self.max_url + s.max_headers * (s.max_header_bytes + 4) + s.max_body_bytes + 4096
        self.sweep_s = max(0.05, min(1.0, s.header_read_timeout_s / 4, s.request_read_timeout_s / 4))

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
        while True:
            await asyncio.sleep(self.sweep_s)
            now = _now()
            for conn in list(self.conns):
                conn.tick(now)

    async def stop_listening(self) -> None:
        """New connections are refused; open ones are still served (answers carry `Connection:
        close` once the collector is not ready)."""
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        """Close every connection (a request still incomplete gets no answer), stop the sweeper."""
        for conn in list(self.conns):
            conn.closing = True
            conn.close()  # written answers are flushed first
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.conns:  # a client that does not read its last answer holds its transport: bounded
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), CLOSE_FLUSH_S)
        for conn in list(self.conns):
            conn.abort()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), CLOSE_FLUSH_S)


class HttpConn(asyncio.Protocol):
    __slots__ = ("began_here", "body", "body_size", "closing", "counted", "front", "hdrs", "head_line", "head_total",
                 "headers", "is_collect", "last_active", "linger_until", "method", "opened", "parser",
                 "path", "paused", "peer", "phase", "query", "served", "started", "transport", "url")

    def __init__(self, front: Front) -> None:
        self.front = front
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.phase = IDLE
        self.served = False  # a request of this connection completed its headers
        self.closing = False  # answered for the last time: nothing more is parsed
        self.linger_until = 0.0
        self.opened = self.started = self.last_active = 0.0
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.hdrs: CIMultiDictProxy[str] | None = None
        self.method = ""
        self.path = ""
        self.query = ""
        self.is_collect = False
        self.counted = False  # inside Collector.inflight
        self.body: list[bytes] = []
        self.body_size = 0
        self.began_here = False
        self.head_line = 0
        self.head_total = 0
        self.paused = False

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) and peer else None
        self.opened = self.last_active = _now()
        self.front.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        front = self.front
        front.conns.discard(self)
        self.transport = None
        self._leave()
        if front._all_closed is not None and not front.conns:
            front._all_closed.set()

    def pause_writing(self) -> None:  # the client does not read its answers: stop reading requests
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        # the client will send nothing more: a request still incomplete can never be answered
        # usefully (aiohttp's front also just closes); an answer already written is flushed
        self._leave()
        return None  # close the transport (after the write buffer is flushed)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after a refusal: discard
        self.last_active = _now()
        self.began_here = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.closing:
                return
            if self.phase == IDLE:  # the request was answered; no protocol switch follows
                self.closing = True
                self.close()
            else:
                self._protocol_error(400, "bad_http", "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as err:
            if self.closing:
                return  # we stopped the parser on purpose, or closed after `Connection: close`
            self._protocol_error(400, "bad_http", f"malformed request: {err}")
            return
        if self.phase == HEAD:
            self._bound_head(data)

    def _bound_head(self, data: bytes) -> None:
        """A header section still arriving may not grow past the caps (in bytes received)."""
        n = len(data)
        nl = data.rfind(b"\n")
        if self.began_here:
            cut = max(data.rfind(b"\n\r\n"), data.rfind(b"\n\n"))
            self.head_total = n if cut < 0 else n - cut
            self.head_line = n if nl < 0 else n - nl - 1
        else:
            self.head_total += n
            self.head_line = self.head_line + n if nl < 0 else n - nl - 1
        front = self.front
        if self.head_line > front.line_cap or self.head_total > front.head_cap:
            self._protocol_error(431, "header_too_large", "request header section too large")

    def tick(self, now: float) -> None:
        """The sweeper's per-connection check: timeouts, keep-alive, the end of lingering."""
        s = self.front.settings
        if self.closing:
            if now >= self.linger_until:
                self.close()
        elif self.phase == BODY:
            if now - self.started > s.request_read_timeout_s:
                reply = self.front.collector.reject(408, "read_timeout", "request body not received in time")
                self._refuse(self._cors(reply))
        elif self.phase == HEAD or not self.served:
            since = self.started if (self.phase == HEAD and self.served) else self.opened
            if now - since > s.header_read_timeout_s:
                self.front.metrics.rejected.labels("header_timeout").inc()
                self.closing = True
                self._leave()
                self.close()
        elif now - self.last_active > KEEPALIVE_S:
            self.closing = True
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop
        self.phase = HEAD
        self.began_here = True
        self.started = _now()
        self.url = b""
        self.headers = []
        self.hdrs = None
        self.method = ""
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.front.max_url:
            if b"?" in self.url:
                self._refuse(self.front.collector.too_large())
            else:
                self._protocol_error(431, "header_too_large", "request line too long")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        s = self.front.settings
        if len(name) + len(value) > s.max_header_bytes or len(self.headers) >= s.max_headers:
            self._protocol_error(431, "header_too_large", "request header too large, or too many")
            raise _Stop
        self.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self.phase = BODY
        self.served = True
        self.started = _now()
        front = self.front
        collector = front.collector
        settings = front.settings
        self.method = self.parser.get_method().decode("ascii", "replace")
        raw = self.url
        if raw[:1] != b"/":  # absolute form (`http://host/path?q`) or `*`
            try:
                parsed = httptools.parse_url(raw)
                raw = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            except httptools.HttpParserInvalidURLError:
                pass
        if b"#" in raw:  # a fragment is not sent to servers; aiohttp drops it too
            raw = raw[:raw.find(b"#")]
        q = raw.find(b"?")
        path = (raw if q < 0 else raw[:q]).decode("utf-8", "surrogateescape")
        if "%" in path:
            path = unquote(path, errors="surrogateescape")
        self.path = path
        self.query = "" if q < 0 else raw[q + 1:].decode("utf-8", "surrogateescape")
        self.hdrs = hdrs = CIMultiDictProxy(CIMultiDict(self.headers))
        if "Host" not in hdrs and self.parser.get_http_version() == "1.1":
            self._protocol_error(400, "bad_http", "HTTP/1.1 request without Host")  # RFC 9112 §3.2, as aiohttp
            raise _Stop
        self.is_collect = path in COLLECT_PATHS
        if self.is_collect:
            collector.inflight.enter()
            self.counted = True
            if collector.inflight.count > settings.max_in_flight:
                self._refuse(self._cors(collector.reject(
                    503, "overloaded", "too many requests in flight, retry later", {"Retry-After": "1"})))
                raise _Stop
        length = hdrs.get("Content-Length")
        if length is not None:
            try:
                over = int(length) > settings.max_body_bytes
            except ValueError:  # llhttp has validated it: unreachable
                over = False
            if over:
                self._refuse(self._cors(collector.too_large()))
                raise _Stop
        expect = hdrs.get("Expect")
        if expect is not None and expect.strip().lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.front.settings.max_body_bytes:
            self._refuse(self._cors(self.front.collector.too_large()))
            raise _Stop
        if self.is_collect:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.phase = IDLE
        transport = self.transport
        if transport is None:
            return
        front = self.front
        collector = front.collector
        method = self.method
        head = method == "HEAD"
        keep = collector.ready and self.parser.should_keep_alive()
        path = self.path
        if self.is_collect:
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.body = []
            try:
                reply = collector.handle(method, path, self.query, self.hdrs or {}, body, self.peer)
            except Exception:  # a bug must not take the connection loop down
                log.exception("collect failed")
                collector.metrics.rejected.labels("server_error").inc()
                reply = Reply(500, {}, b"internal error\n")
            self._leave()
            if reply is OK_REPLY:
                transport.write(front.ok_bytes(not keep))
            else:
                transport.write(render(reply.status, reply.headers, reply.body, front.date.get(), not keep, head))
        elif path in PLAIN_PATHS:
            if method != "GET" and not head:
                self._reply(405, b"405: Method Not Allowed", keep, head, {"Allow": "GET,HEAD"})
            elif path == "/health":
                self._reply(200, b"ok", keep, head)
            elif path == "/ready":
                if collector.ready:
                    self._reply(200, b"ready", keep, head)
                else:
                    self._reply(503, b"not ready", keep, head)
            else:
                self._reply(200, front.metrics.render(), keep, head, {"Content-Type": CONTENT_TYPE})
        else:
            self._reply(404, b"404: Not Found", keep, head)
        if not keep:
            self.closing = True
            transport.close()
            raise _Stop  # nothing after this request is read (pipelined bytes are dropped)

    # ------------------------------------------------------------------ replies

    def _cors(self, reply: Reply) -> Reply:
        return self.front.collector.with_cors(reply, self.hdrs) if self.hdrs is not None else reply

    def _reply(self, status: int, body: bytes, keep: bool, head: bool,
               headers: Mapping[str, str] | None = None) -> None:
        if self.transport is not None:
            h = {"Content-Type": TEXT, **(headers or {})}
            self.transport.write(render(status, h, body, self.front.date.get(), not keep, head))

    def _leave(self) -> None:
        if self.counted:
            self.counted = False
            self.front.collector.inflight.leave()

    def _refuse(self, reply: Reply) -> None:
        """Answer now, stop reading requests; the rest the client sends is discarded (lingering)."""
        if self.closing:
            return
        self.closing = True
        self._leave()
        self.phase = IDLE
        transport = self.transport
        if transport is None:
            return
        head = self.method == "HEAD" and self.hdrs is not None
        transport.write(render(reply.status, reply.headers, reply.body, self.front.date.get(), True, head))
        self.linger_until = _now() + LINGER_S
        if transport.can_write_eof():
            transport.write_eof()  # the client sees the end of the answer; we still read what it sends
        else:  # pragma: no cover - TCP transports can
            transport.close()

    def _protocol_error(self, status: int, reason: str, detail: str) -> None:
        """400/431 before /collect runs: counted and logged (rate-limited) like the aiohttp front's."""
        if self.closing:
            return
        self.front.protocol_errors.note(reason, detail)
        msg = b"request header fields too large\n" if status == 431 else b"malformed request\n"
        self._refuse(Reply(status, {"Content-Type": TEXT}, msg))
