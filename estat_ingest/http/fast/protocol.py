"""One connection of the fast front (`HttpConn`, an asyncio.Protocol): httptools' callbacks parse
the request, `Collector.handle` answers /collect, and the connection's timers are checked by the
front's sweep (`tick`), never by a timer of its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from estat_ingest.http.collect import OK_REPLY
from estat_ingest.http.fast.render import render
from estat_ingest.http.policy import (
    CHUNK_FRAMING_TOO_LARGE,
    COLLECT_PATHS,
    CONNECT_WITH_BODY,
    ENCODED_PATH,
    FULL_HOLD_S,
    HEADER_TOO_LARGE,
    HEALTH,
    INTERNAL_ERROR,
    MALFORMED,
    NOT_FOUND,
    OVERLOADED,
    PLAIN_NOT_ALLOWED,
    PLAIN_PATHS,
    READ_TIMEOUT,
    UNKNOWN_CODING,
    Reply,
    announces_keep_alive,
    closes_after,
    connect_with_body,
    duplicate_framing_header,
    metrics_answer,
    ready_reply,
    send_continue,
    unknown_coding,
)

if TYPE_CHECKING:
    from estat_ingest.http.fast.front import Front

log = logging.getLogger("estat_ingest.fastfront")  # a stable name for log filters, whatever the module path
_now = time.monotonic  # every timer of this front (uvloop's loop.time() has another origin)

# where a connection is in its current request; UPGRADE: llhttp took it for a protocol switch and
# skipped its body, which a parser replaying its framing reads next (HttpConn._after_upgrade)
IDLE, HEAD, BODY, UPGRADE = 0, 1, 2, 3
# what follows an answer: the close (`Connection: close`), the next request, or the next request and
# the answer says `Connection: keep-alive` (the request asked for it; an HTTP/1.0 client needs it)
CLOSE, KEEP, KEEP_SAID = 0, 1, 2

# header names as received -> their lower-case str: one dict look-up per header instead of a decode,
# and lower-case names let a plain dict show a repeated name. Bounded: clients choose the names.
_NAMES: dict[bytes, str] = {}
_NAMES_MAX, _NAME_MAX_LEN = 512, 64
# request targets without a query, as sent -> their path (what `HttpConn._target` makes of them):
# bounded the same way; the methods llhttp knows -> their str
_PATHS: dict[bytes, str] = {}
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")}


def _name(raw: bytes) -> str:
    name = raw.decode("latin-1").lower()
    if len(raw) <= _NAME_MAX_LEN:
        if len(_NAMES) >= _NAMES_MAX:
            _NAMES.clear()
        _NAMES[raw] = name
    return name


class _Stop(Exception):
    """Raised from a parser callback once the connection has answered and stops reading."""


class HttpConn(asyncio.Protocol):
    __slots__ = ("began_here", "body", "body_size", "body_wire", "closing", "counted", "front", "hdrs", "head_line",
                 "head_total", "held", "is_collect", "keep", "last_active", "linger_until", "method",
                 "names", "opened", "out", "parser", "path", "paused", "peer", "phase", "query", "repeated", "replay",
                 "served", "started",
                 "stash", "transport", "url", "waiting")

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
        # the request's headers: lower-case name -> its first value, and the lines whose name came
        # before (rare; None without any): `hdrs` is `names` itself when no name repeats
        self.names: dict[str, str] = {}
        self.repeated: list[tuple[str, str]] | None = None
        self.hdrs: Mapping[str, str] | None = None
        self.method = ""
        self.path = ""
        self.query = ""
        self.is_collect = False
        self.counted = False  # inside Collector.inflight
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_wire = 0  # bytes received while the body was arriving (chunked framing bound)
        self.keep = CLOSE  # whether the connection goes on after this request: llhttp's verdict, less the policy's
        self.replay = b""  # an Upgrade request's framing, for the parser that reads its body
        self.began_here = False
        self.head_line = 0
        self.head_total = 0
        self.paused = False  # reading paused: the client does not read its answers
        self.held = False  # reading paused for FULL_HOLD_S after a 503 for want of room
        self.stash: bytes | None = None  # data read over the pass's budget: read next pass, reading paused
        # answers not written yet, in request order, as (pending, data, keep, head): an accepted
        # /collect waiting for its ticket (ACK_MODE=durable; a Reply, holding its in-flight count), a
        # /metrics of the worker group still being gathered (a Future of its Reply), or the bytes of
        # an answer queued behind one (pending None); keep False closes after it
        self.waiting: deque[tuple[Reply | asyncio.Future[Reply] | None, bytes, int, bool]] | None = None
        # answers written but not yet handed to the transport: they go out together at the end of
        # the loop's pass over the sockets that were ready (Front.flush), in order
        self.out: list[bytes] | None = None

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
        self.out = None
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
            if not self.held and self.stash is None:
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            if not self.held and self.stash is None:
                self.transport.resume_reading()

    def _hold(self) -> None:
        """After a 503 for want of room: read this connection's next request FULL_HOLD_S later."""
        transport = self.transport
        if transport is None or self.held:
            return
        self.held = True
        if not self.paused and self.stash is None:
            transport.pause_reading()
        loop = self.front.loop
        assert loop is not None, "connections exist only after Front.start()"
        loop.call_later(FULL_HOLD_S, self._unhold)

    def _unhold(self) -> None:
        self.held = False
        if self.transport is not None and not self.paused and not self.closing and self.stash is None:
            self.transport.resume_reading()

    def read_deferred(self) -> None:
        """The data that waited for this pass (Front.next_pass), then reading goes on."""
        data, self.stash = self.stash, None
        transport = self.transport
        if data is None or transport is None:
            return  # (the connection was lost meanwhile)
        self.data_received(data)
        if self.stash is None and self.transport is not None and not (self.paused or self.held or self.closing):
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
        self.flush()
        return None  # close the transport (after the write buffer is flushed)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after a refusal: discard
        front = self.front
        if not front.spend(len(data)):  # this pass has read its share (PASS_BYTES): the next one reads it
            self.stash = data
            front.deferred.append(self)
            front.deferred_reads += 1
            transport = self.transport
            if transport is not None and transport.is_reading():
                transport.pause_reading()
            return
        self.last_active = _now()
        self.began_here = False
        phase = self.phase
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._after_upgrade(memoryview(data), upgrade.args[0])
            return
        except httptools.HttpParserError as err:
            if self.closing:
                return  # we stopped the parser on purpose, or closed after `Connection: close`
            self._protocol_error(MALFORMED, "bad_http", f"malformed request: {err}")
            return
        if self.phase == HEAD:
            self._bound_head(data)
        elif phase == BODY == self.phase and not self.began_here:  # all of `data` is this body's
            self._bound_body(len(data))

    def _after_upgrade(self, data: memoryview, at: int) -> None:
        """llhttp stopped at a request it takes for a protocol switch (`Connection: Upgrade` with
        `Upgrade:`, or CONNECT) and `data[at:]` is what follows its head. An ingest server switches
        to nothing (http/policy.py): a new parser goes on with those bytes, after replaying the
        request's framing when its body is still to be read (the h2c POST of `curl --http2`)."""
        while not self.closing:
            replaying = self.phase == UPGRADE
            if replaying:
                self.phase = BODY
            self.parser = parser = httptools.HttpRequestParser(_Resumed(self, replaying))
            rest = data[at:]
            phase = self.phase
            self.began_here = False
            try:
                if replaying:
                    parser.feed_data(self.replay)
                parser.feed_data(rest)
            except httptools.HttpParserUpgrade as upgrade:
                data, at = rest, upgrade.args[0]
                continue
            except httptools.HttpParserError as err:
                if not self.closing:
                    self._protocol_error(MALFORMED, "bad_http", f"malformed request: {err}")
                return
            if self.phase == HEAD:
                self._bound_head(bytes(rest))
            elif phase == BODY == self.phase and not self.began_here:
                self._bound_body(len(rest))
            return

    def _bound_body(self, n: int) -> None:
        """A body still arriving may not spend more than the policy's bound on its framing: llhttp
        reads chunk extensions and trailers without one. Counted over the segments that held
        nothing but this body (the first and last may also hold other requests)."""
        self.body_wire += n
        if self.body_wire - self.body_size > self.front.limits.chunk_framing_bytes:
            self._protocol_error(MALFORMED, "bad_http", CHUNK_FRAMING_TOO_LARGE)

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
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self.out = None
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        """Queue an answer's bytes: handed to the transport with this connection's other answers by
        `flush`, which the front calls once the loop has run the callbacks of every socket that was
        ready. One write per connection per pass, and the clients of a pass are answered
        back to back: measured at 64 connections on one core, +40% requests per CPU-second, since
        a write while the client's reader is still awake from the previous one costs no wake-up
        (docs/tuning.md). The order of a connection's answers is the order of the calls."""
        out = self.out
        if out is None:
            self.out = [data]
            self.front.defer(self)
        else:
            out.append(data)

    def flush(self) -> None:
        """Hand the queued answers to the transport (before anything that ends the connection)."""
        out = self.out
        if out is not None:
            self.out = None
            if self.transport is not None:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop
        self.phase = HEAD
        self.began_here = True
        self.started = self.last_active  # when the bytes being parsed arrived (data_received)
        self.url = b""
        self.names = {}
        self.repeated = None
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
        names = self.names
        key = _NAMES.get(name) or _name(name)
        front = self.front
        if (key in names or self.repeated is not None or len(names) >= front.max_headers
                or len(name) + len(value) > front.header_line_bytes):
            self._header(key, name, value)  # a repeated name, or near a cap
        else:
            names[key] = value.decode("utf-8", "surrogateescape")

    def _header(self, key: str, name: bytes, value: bytes) -> None:
        """A header line that `on_header` does not take in one step: the caps (a header line's
        size, the lines of the section), and a name that came before (kept in `repeated`)."""
        front = self.front
        names = self.names
        repeated = self.repeated
        if (len(name) + len(value) > front.header_line_bytes
                or len(names) + (0 if repeated is None else len(repeated)) >= front.max_headers):
            self._protocol_error(HEADER_TOO_LARGE, "header_too_large", "request header too large, or too many")
            raise _Stop
        text = value.decode("utf-8", "surrogateescape")
        if key not in names:
            names[key] = text
        elif repeated is None:
            self.repeated = [(key, text)]
        else:
            repeated.append((key, text))

    def on_headers_complete(self) -> None:
        self.phase = BODY
        self.served = True
        self.started = self.last_active
        self.body_wire = 0
        front = self.front
        collector = front.collector
        parser = self.parser
        raw_method = parser.get_method()
        self.method = method = _METHODS.get(raw_method) or raw_method.decode("ascii", "replace")
        path = _PATHS.get(self.url)  # most requests: a path seen before, without a query
        if path is None:
            path = self._target()
        else:
            self.path = path
            self.query = ""
        names = self.names
        hdrs: Mapping[str, str] = names  # what /collect reads: lower-case names, first values
        if self.repeated is not None:  # a name repeated: a multidict, every line in it
            lines = [*names.items(), *self.repeated]
            if dup := duplicate_framing_header(n for n, _ in lines):
                self._protocol_error(MALFORMED, "bad_http", f"duplicate {dup} header")
                raise _Stop
            hdrs = CIMultiDictProxy(CIMultiDict(lines))
            names = dict(lines)  # the policy's checks below see a repeated name's last value,
            conns = [v for n, v in lines if n == "connection"]
            if len(conns) > 1:  # but every Connection line, as llhttp's keep-alive verdict does
                names["connection"] = ", ".join(conns)
        self.hdrs = hdrs
        if "host" not in names and parser.get_http_version() == "1.1":
            self._protocol_error(MALFORMED, "bad_http", "HTTP/1.1 request without Host")  # RFC 9112 §3.2, as aiohttp
            raise _Stop
        length = names.get("content-length")
        size = None
        if length is not None:
            try:
                size = int(length)
            except ValueError:  # llhttp has validated it: unreachable
                size = None
        te = names.get("transfer-encoding")
        if te is not None and unknown_coding(te):
            self._protocol_error(MALFORMED, "bad_http", UNKNOWN_CODING)
            raise _Stop
        keep = parser.should_keep_alive()
        if te is not None and keep and closes_after(parser.get_http_version() == "1.0", True):
            keep = False
        if ("upgrade" in names or method == "CONNECT") and parser.should_upgrade():  # its body: _after_upgrade
            if connect_with_body(method, hdrs):
                self._protocol_error(MALFORMED, "bad_http", CONNECT_WITH_BODY)
                raise _Stop
            if te is not None or size:  # the framing the parser that reads the body is first fed
                self.phase = UPGRADE
                self.replay = b"".join([b"POST / HTTP/1.1\r\n",
                                        b"" if size is None else b"Content-Length: %d\r\n" % size,
                                        b"" if te is None else b"Transfer-Encoding: %s\r\n"
                                        % te.encode("utf-8", "surrogateescape"), b"\r\n"])
        conn = names.get("connection")  # browsers send exactly `keep-alive`: no call for them
        self.keep = (CLOSE if not keep else KEEP_SAID if conn is not None and (
            conn == "keep-alive" or announces_keep_alive(conn)) else KEEP)
        self.is_collect = path in COLLECT_PATHS
        if self.is_collect:
            self.counted = True  # admitted or not, counted until it is answered
            if not collector.inflight.admit():
                self._refuse(self._cors(collector.refuse(OVERLOADED)))
                raise _Stop
        if size is not None and size > front.limits.body_bytes:
            self._refuse(self._cors(collector.too_large()))
            raise _Stop
        expect = names.get("expect")
        if (expect is not None and self.transport is not None
                and send_continue(expect, parser.get_http_version() == "1.1", size, front.limits)):
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _target(self) -> str:
        """The request target's path and query (`self.path`, `self.query`), and the path returned;
        a query-less target is remembered in `_PATHS` for the next request that sends it."""
        raw = url = self.url
        if raw[:1] != b"/":  # absolute form (`http://host/path?q`) or `*`
            try:
                parsed = httptools.parse_url(raw)
                raw = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            except httptools.HttpParserInvalidURLError:
                pass
        cut = raw.find(b"#")
        if cut >= 0:  # a fragment is not sent to servers; aiohttp drops it too
            raw = raw[:cut]
        q = raw.find(b"?")
        path = (raw if q < 0 else raw[:q]).decode("utf-8", "surrogateescape")
        if "%" in path:  # routed as sent, never decoded: refused (http/policy.py)
            self._protocol_error(MALFORMED, "bad_http", ENCODED_PATH)
            raise _Stop
        self.path = path
        self.query = "" if q < 0 else raw[q + 1:].decode("utf-8", "surrogateescape")
        if q < 0 and len(url) <= _NAME_MAX_LEN:
            if len(_PATHS) >= _NAMES_MAX:
                _PATHS.clear()
            _PATHS[url] = path
        return path

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.front.limits.body_bytes:
            self._refuse(self._cors(self.front.collector.too_large()))
            raise _Stop
        if self.is_collect:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        if self.phase == UPGRADE:  # llhttp skipped this request's body: it completes after _after_upgrade
            return
        self.phase = IDLE
        transport = self.transport
        if transport is None:
            return
        front = self.front
        collector = front.collector
        method = self.method
        head = method == "HEAD"
        keep = collector.ready and self.keep
        path = self.path
        if self.is_collect:
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.body = []
            try:
                reply = collector.answer(method, path, self.query, self.hdrs or {}, body, self.peer)
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
            elif reply is OK_REPLY:  # most requests: `self.write` inline
                data = front.ok_bytes(not keep, keep == KEEP_SAID)
                if self.out is None:
                    self.out = [data]
                    front.defer(self)
                else:
                    self.out.append(data)
            else:
                self.write(render(reply.status, reply.headers, reply.body, front.date.get(), not keep, head,
                                  keep == KEEP_SAID))
                if reply.status == 503 and keep:  # no room (a draining server does not keep): FULL_HOLD_S
                    self._hold()
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
                self.close()
            raise _Stop  # nothing after this request is read (pipelined bytes are dropped)

    # ------------------------------------------------------------------ replies

    def _cors(self, reply: Reply) -> Reply:
        return self.front.collector.with_cors(reply, self.hdrs) if self.hdrs is not None else reply

    def _send(self, reply: Reply, keep: int, head: bool) -> None:
        if self.waiting:  # behind an answer that waits for the spool
            self.waiting.append((None, self._bytes(reply, keep, head), keep, head))
        elif self.transport is not None:
            self.write(render(reply.status, reply.headers, reply.body, self.front.date.get(), not keep, head,
                              keep == KEEP_SAID))

    def _bytes(self, reply: Reply, keep: int, head: bool) -> bytes:
        if reply is OK_REPLY:
            return self.front.ok_bytes(not keep, keep == KEEP_SAID)
        return render(reply.status, reply.headers, reply.body, self.front.date.get(), not keep, head, keep == KEEP_SAID)

    def _wait(self, reply: Reply | asyncio.Future[Reply], keep: int, head: bool) -> None:
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
            self.write(data)
            if not keep:
                waiting.clear()
                self._end(transport)

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
        data = render(reply.status, reply.headers, reply.body, self.front.date.get(), True, head)
        if self.waiting:  # answers to earlier requests still wait for the spool: this one goes after them
            self.waiting.append((None, data, CLOSE, head))
            return
        self.write(data)
        self._end(transport)

    def _end(self, transport: asyncio.Transport) -> None:
        """After the last answer: half-close, so the client reads it rather than a reset caused by
        bytes it still sends (RFC 9112 §9.6), then discard what comes until the linger time ends."""
        self.linger_until = _now() + self.front.limits.linger_s
        self.flush()
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


class _Resumed:
    """The protocol of a parser that goes on after llhttp stopped at an Upgrade or CONNECT request
    (HttpConn._after_upgrade): the connection's own callbacks, except for the head it is first fed
    to learn the stopped request's framing (`replaying`), which belongs to a request already read."""

    __slots__ = ("conn", "replaying")

    def __init__(self, conn: HttpConn, replaying: bool) -> None:
        self.conn = conn
        self.replaying = replaying

    def on_message_begin(self) -> None:
        if not self.replaying:
            self.conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.replaying:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.replaying:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.replaying:
            self.replaying = False
        else:
            self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()
