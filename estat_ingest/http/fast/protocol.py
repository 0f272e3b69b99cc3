"""One connection of the fast front (`HttpConn`, an asyncio.Protocol): httptools' callbacks parse
the request, `Collector.handle` answers /collect, and the connection's timers are checked by the
front's sweep (`tick`), never by a timer of its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from estat_ingest.http.collect import OK_REPLY
from estat_ingest.http.fast.render import render
from estat_ingest.http.policy import (
    COLLECT_PATHS,
    HEADER_TOO_LARGE,
    HEALTH,
    INTERNAL_ERROR,
    MALFORMED,
    NOT_FOUND,
    OVERLOADED,
    PLAIN_NOT_ALLOWED,
    PLAIN_PATHS,
    READ_TIMEOUT,
    Reply,
    metrics_answer,
    ready_reply,
)

if TYPE_CHECKING:
    from estat_ingest.http.fast.front import Front

log = logging.getLogger("estat_ingest.fastfront")  # a stable name for log filters, whatever the module path
_now = time.monotonic  # every timer of this front (uvloop's loop.time() has another origin)

IDLE, HEAD, BODY = 0, 1, 2  # where a connection is in its current request


class _Stop(Exception):
    """Raised from a parser callback once the connection has answered and stops reading."""


class HttpConn(asyncio.Protocol):
    __slots__ = ("began_here", "body", "body_size", "closing", "counted", "front", "hdrs", "head_line", "head_total",
                 "headers", "is_collect", "last_active", "linger_until", "method", "opened", "parser",
                 "path", "paused", "peer", "phase", "query", "served", "started", "transport", "url", "waiting")

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
        # answers not written yet, in request order, as (pending, data, keep, head): an accepted
        # /collect waiting for its ticket (ACK_MODE=durable; a Reply, holding its in-flight count), a
        # /metrics of the worker group still being gathered (a Future of its Reply), or the bytes of
        # an answer queued behind one (pending None); keep False closes after it
        self.waiting: deque[tuple[Reply | asyncio.Future[Reply] | None, bytes, bool, bool]] | None = None

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
        if self.waiting:  # the client is gone: its events are durable (or not) all the same
            for reply, _data, _keep, _head in self.waiting:
                if isinstance(reply, asyncio.Future):
                    reply.cancel()
                elif reply is not None:
                    front.collector.inflight.leave()
            self.waiting.clear()
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
        waiting = self.waiting
        if waiting:  # answers still due (durable): written first, then the transport is closed
            reply, data, _keep, head = waiting[-1]
            waiting[-1] = (reply, data, False, head)
            self.closing = True
            return True
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
                self._protocol_error(MALFORMED, "bad_http", "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as err:
            if self.closing:
                return  # we stopped the parser on purpose, or closed after `Connection: close`
            self._protocol_error(MALFORMED, "bad_http", f"malformed request: {err}")
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
            self._protocol_error(HEADER_TOO_LARGE, "header_too_large", "request header section too large")

    def tick(self, now: float) -> None:
        """The sweeper's per-connection check: timeouts, keep-alive, the end of lingering."""
        limits = self.front.limits
        if self.closing:
            if now >= self.linger_until and not self.waiting:  # (answers still due: written first)
                self.close()
        elif self.phase == BODY:
            if now - self.started > limits.body_read_s:
                self._refuse(self._cors(self.front.collector.refuse(READ_TIMEOUT)))
        elif self.phase == HEAD or not self.served:
            since = self.started if (self.phase == HEAD and self.served) else self.opened
            if now - since > limits.header_read_s:
                self.front.metrics.rejected.labels("header_timeout").inc()
                self.closing = True
                self._leave()
                self.close()
        elif now - self.last_active > limits.keepalive_s:
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
                self._protocol_error(HEADER_TOO_LARGE, "header_too_large", "request line too long")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.front.limits
        if len(name) + len(value) > limits.header_line_bytes or len(self.headers) >= limits.headers:
            self._protocol_error(HEADER_TOO_LARGE, "header_too_large", "request header too large, or too many")
            raise _Stop
        self.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self.phase = BODY
        self.served = True
        self.started = _now()
        front = self.front
        collector = front.collector
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
            self._protocol_error(MALFORMED, "bad_http", "HTTP/1.1 request without Host")  # RFC 9112 §3.2, as aiohttp
            raise _Stop
        self.is_collect = path in COLLECT_PATHS
        if self.is_collect:
            self.counted = True  # admitted or not, counted until it is answered
            if not collector.inflight.admit():
                self._refuse(self._cors(collector.refuse(OVERLOADED)))
                raise _Stop
        length = hdrs.get("Content-Length")
        if length is not None:
            try:
                over = int(length) > front.limits.body_bytes
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
        if self.body_size > self.front.limits.body_bytes:
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
                reply = INTERNAL_ERROR
            if reply.ticket is not None:  # durable: answer once its events are fsynced
                self.counted = False  # the waiting answer holds the in-flight count now
                self._wait(reply, keep, head)
                if not keep:
                    self.closing = True  # nothing more is read; closed once the answer is written
                    raise _Stop
                return
            self._leave()
            if self.waiting:
                self.waiting.append((None, self._bytes(reply, keep, head), keep, head))
            elif reply is OK_REPLY:
                transport.write(front.ok_bytes(not keep))
            else:
                transport.write(render(reply.status, reply.headers, reply.body, front.date.get(), not keep, head))
        elif path in PLAIN_PATHS:
            if method != "GET" and not head:
                self._send(PLAIN_NOT_ALLOWED, keep, head)
            elif path == "/health":
                self._send(HEALTH, keep, head)
            elif path == "/ready":
                self._send(ready_reply(collector.ready and collector.healthy()), keep, head)
            else:
                answer = metrics_answer(front.metrics)
                if isinstance(answer, Reply):
                    self._send(answer, keep, head)
                else:  # the worker group's, gathered by the parent: written when it comes, in order
                    self._wait(answer, keep, head)
        else:
            self._send(NOT_FOUND, keep, head)
        if not keep:
            self.closing = True
            if not self.waiting:  # else closed once the answers before this one are written
                transport.close()
            raise _Stop  # nothing after this request is read (pipelined bytes are dropped)

    # ------------------------------------------------------------------ replies

    def _cors(self, reply: Reply) -> Reply:
        return self.front.collector.with_cors(reply, self.hdrs) if self.hdrs is not None else reply

    def _send(self, reply: Reply, keep: bool, head: bool) -> None:
        if self.waiting:  # behind an answer that waits for the spool
            self.waiting.append((None, self._bytes(reply, keep, head), keep, head))
        elif self.transport is not None:
            self.transport.write(render(reply.status, reply.headers, reply.body, self.front.date.get(), not keep, head))

    def _bytes(self, reply: Reply, keep: bool, head: bool) -> bytes:
        if reply is OK_REPLY:
            return self.front.ok_bytes(not keep)
        return render(reply.status, reply.headers, reply.body, self.front.date.get(), not keep, head)

    def _wait(self, reply: Reply | asyncio.Future[Reply], keep: bool, head: bool) -> None:
        if self.waiting is None:
            self.waiting = deque()
        self.waiting.append((reply, b"", keep, head))
        ticket = reply if isinstance(reply, asyncio.Future) else reply.ticket
        assert ticket is not None
        ticket.add_done_callback(self._flush)

    def _flush(self, _done: object = None) -> None:
        """Write the waiting answers whose turn has come: in request order, each accepted /collect
        only once its ticket is done (the spool fsync that covers its events returned)."""
        waiting = self.waiting
        collector = self.front.collector
        while waiting:
            reply, data, keep, head = waiting[0]
            if isinstance(reply, asyncio.Future):  # /metrics of the group (never raises; cancelled only
                if not reply.done():               # with its connection, which empties `waiting`)
                    return
                data = self._bytes(reply.result(), keep, head)
            elif reply is not None:
                assert reply.ticket is not None
                if not reply.ticket.done():
                    return
                collector.inflight.leave()
                data = self._bytes(collector.settle(reply), keep, head)
            waiting.popleft()
            transport = self.transport
            if transport is None:
                continue
            transport.write(data)
            if not keep:
                waiting.clear()
                transport.close()

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
        self.linger_until = _now() + self.front.limits.linger_s
        if transport.can_write_eof():
            transport.write_eof()  # the client sees the end of the answer; we still read what it sends
        else:  # pragma: no cover - TCP transports can
            transport.close()

    def _protocol_error(self, reply: Reply, reason: str, detail: str) -> None:
        """400/431 before /collect runs: counted and logged (rate-limited) like the aiohttp front's."""
        if self.closing:
            return
        self.front.protocol_errors.note(reason, detail)
        self._refuse(reply)
