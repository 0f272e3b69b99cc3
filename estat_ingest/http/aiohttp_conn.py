"""The aiohttp front's connections under the edge policy's framing rules (http/policy.py,
"Framing"), where aiohttp's own parser and request handler do otherwise.

aiohttp's C parser is llhttp, as the fast front's. Left alone it: drops the bytes that follow an
Upgrade request it does not switch for (an `h2c` POST, `Upgrade: foo`) in the same segment; serves
the body of a CONNECT as the next request; loses every request of a segment in which a later one is
malformed (or follows a `Connection: close` one), because one parse error discards the segment's
requests; closes at once when the client half-closes after its request (the event is stored, never
answered: the client retries, the event is stored twice); answers before a body it does not read
and then closes silently when that body turns out broken; and keeps an HTTP/1.0 connection after a
chunked request. The policy's refusals that aiohttp does not make (a repeated Content-Encoding,
CONNECT with a body, a percent-encoded path, chunked framing over its bound) need the request
before a handler runs. So:

- `FramingParser` is aiohttp's C parser told to pause after every request
  (`max_msg_queue_size=1`), so each call hands back at most one request and what follows stays
  unparsed until the next call. Between two requests it judges the one handed back (a policy
  refusal becomes the 400 aiohttp gives to what its parser refuses, and nothing after it is parsed)
  and steps over llhttp's upgrade stop without letting the parser drop what follows; a parse error
  after good requests becomes a 400 queued behind them; a parse error or the framing bound in the
  middle of a body fails that body at once (the handler answers 400 instead of waiting for the
  read timeout).
- `FramingHandler` (aiohttp's RequestHandler with that parser) answers what the client sent before
  its FIN, then closes; and makes an answer say `Connection: close` whenever the connection ends
  after it: its request's body is not complete yet, the client has half-closed, or the server is
  draining.
- `FramingRunner` is aiohttp's AppRunner with connections of that handler.

Cost (bench/aiohttp_conn_instructions.py, callgrind): POST /collect 312.6k instructions per request
with aiohttp's own handler, 328.6k with this one (+5.1%): a Python call per segment and per request,
a second (empty) llhttp call after each request's pause, the policy's checks; no extra system call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.http_parser import SINGLETON_HEADERS, HttpRequestParser
from aiohttp.http_writer import HttpVersion10, HttpVersion11
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from estat_ingest.http.collect import Collector
from estat_ingest.http.policy import (
    CHUNK_FRAMING_TOO_LARGE,
    CONNECT_WITH_BODY,
    ENCODED_PATH,
    FRAMING_HEADERS,
    UNKNOWN_CODING,
    Limits,
    closes_after,
    connect_with_body,
    unknown_coding,
)

# what this module stands on: aiohttp's C parser (its pure-Python one frames in its own way) with the
# per-request pause (`max_msg_queue_size`, aiohttp 3.14.5); at import, so `serve` stops with the reason
if HttpRequestParser.__module__ != "aiohttp._http_parser":  # pragma: no cover - AIOHTTP_NO_EXTENSIONS
    raise ImportError("HTTP_FRONT=aiohttp needs aiohttp's C HTTP parser (llhttp); AIOHTTP_NO_EXTENSIONS is set "
                      "or the extension is missing")
try:
    HttpRequestParser(None, None, 1, max_msg_queue_size=1)
except TypeError as _err:  # pragma: no cover - an older aiohttp
    raise ImportError("HTTP_FRONT=aiohttp needs aiohttp >= 3.14.5 (its parser's max_msg_queue_size)") from _err

MAX_PER_FEED = 32  # requests one segment may queue (aiohttp's own bound: web_protocol.MAX_MSG_QUEUE_SIZE)
_NOTHING: tuple[Any, bool, bytes] = ((), False, b"")
_feed = HttpRequestParser.feed_data
_finish = RequestHandler.finish_response
# policy.FRAMING_HEADERS that aiohttp's parser does not refuse a second line of by itself (its
# SINGLETON_HEADERS: Host, Content-Length, Transfer-Encoding, Content-Type...): Content-Encoding
UNCHECKED = tuple(sorted(FRAMING_HEADERS - {name.lower() for name in SINGLETON_HEADERS}))
SPOKEN = frozenset({HttpVersion10, HttpVersion11})


def refusal(detail: str) -> tuple[_ErrInfo, StreamReader]:
    """A request the policy refuses, as aiohttp queues what its parser refuses: a 400 that closes."""
    exc = BadHttpMessage(detail)
    return _ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD


class FramingParser(HttpRequestParser):  # aiohttp's C parser at run time (mypy sees the Python one)
    """aiohttp's llhttp request parser, one request per call underneath, under the edge policy."""

    def __init__(self, protocol: RequestHandler, loop: asyncio.AbstractEventLoop, limit: int, *, limits: Limits,
                 **kwargs: Any) -> None:
        super().__init__(protocol, loop, limit, max_msg_queue_size=1, **kwargs)
        self.limits = limits
        self.done = False  # a refusal, or a closing request complete, was handed out: nothing more is parsed
        self.ends: StreamReader | None = None  # the body of a request after which nothing is parsed
        self.stopped_at: Any = None  # the last request handed out when llhttp took it for an upgrade
        self.body: StreamReader | None = None  # the body still arriving (of the last request handed out)
        self.body_wire = 0  # bytes received while that body was arriving
        self.held = False  # requests may be left unparsed (MAX_PER_FEED were handed out)

    def feed_data(self, data: bytes, *args: Any, **kwargs: Any) -> tuple[Any, bool, bytes]:
        if self.done or not (data or self.held or self.body is not None or self.stopped_at is not None):
            return _NOTHING  # (aiohttp's resume, b"", with nothing left unparsed: once per request)
        self.held = False
        size = len(data)
        arriving = self.body  # a body that was arriving before this segment
        out: list[Any] = []
        feed = _feed
        while True:
            try:
                msgs, upgraded, tail = feed(self, data)
            except HttpProcessingError as exc:
                self.done = True
                self.fail_body(exc)
                if not out:
                    raise  # aiohttp queues its 400
                out.append((_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD))
                return out, False, b""
            paused = False  # llhttp paused after a request that completed in this call
            for msg, payload in msgs:
                if self.judge(out, msg, payload):
                    return out, False, b""
                paused = payload.is_eof()
            if self.ends is not None:  # what follows it is never parsed into a request (RFC 9112 §9.6)
                self.done = self.ends.is_eof()
                break
            if self.body is not None and self.body.is_eof():  # a body handed out earlier completed
                self.body, paused = None, True
            if upgraded:  # aiohttp switched (websocket, CONNECT): an ingest server does not, the rest is HTTP
                self.stopped_at = None
                self.set_upgraded(False)
                data = tail
            elif self.stopped_at is not None and self.stopped_at.is_eof():
                # llhttp paused after that request, before its upgrade stop, which would drop the bytes
                # after it: marked upgraded, the parser hands them back instead
                self.stopped_at = None
                self.set_upgraded(True)
                data = b""
            elif paused and len(out) < MAX_PER_FEED:
                data = b""  # the next request may be complete already
            else:
                self.held = paused  # the rest waits for aiohttp's resume (its queue is full)
                break
        body = self.body
        if body is not None and body is arriving and not out:  # the whole segment was this body's
            self.body_wire += size
            if self.body_wire - body.total_bytes > self.limits.chunk_framing_bytes:
                self.done = True
                self.fail_body(BadHttpMessage(CHUNK_FRAMING_TOO_LARGE))
        return out, False, b""

    def judge(self, out: list[Any], msg: Any, payload: StreamReader) -> bool:
        """Queue `msg` as the policy says; True when it is refused (nothing after it is parsed)."""
        headers = msg.headers
        refused = None
        if "%" in msg.path and "%" in msg.url.raw_path:  # (msg.path is the whole target, query included)
            refused = ENCODED_PATH
        elif msg.method == "CONNECT" and connect_with_body(msg.method, headers):
            refused = CONNECT_WITH_BODY
        elif (te := headers.get("Transfer-Encoding")) is not None and unknown_coding(te):
            refused = UNKNOWN_CODING
        for name in UNCHECKED:
            if name in headers and len(headers.getall(name)) > 1:
                refused = f"duplicate {name} header"
        if refused is not None:
            self.done = True
            out.append(refusal(refused))
            return True
        version = msg.version
        if version is not HttpVersion11:  # (the parser's own HttpVersion11, as a rule)
            if version not in SPOKEN:  # llhttp's HTTP/0.9 and 2.0: framed as 1.0, answered so (not "HTTP/2.0 200")
                msg = msg._replace(version=HttpVersion10)
            if msg.chunked and not msg.should_close and closes_after(msg.version <= HttpVersion10, True):
                msg = msg._replace(should_close=True)
        out.append((msg, payload))
        if msg.upgrade:
            self.stopped_at = payload
        if payload is not EMPTY_PAYLOAD and not payload.is_eof():
            self.body, self.body_wire = payload, 0
        if msg.should_close:
            self.ends = payload
        return False

    def fail_body(self, exc: BaseException) -> None:
        """The body still arriving can never complete: its reader fails now (the handler answers
        400 `bad_body`) instead of waiting for REQUEST_READ_TIMEOUT."""
        body, self.body = self.body, None
        if body is not None and not body.is_eof() and body.exception() is None:
            body.set_exception(exc if isinstance(exc, HttpProcessingError) else BadHttpMessage(str(exc)))


class FramingHandler(RequestHandler):
    """aiohttp's connection with a FramingParser; the closes it owes announced."""

    __slots__ = ("answered", "collector", "peer_eof")

    def __init__(self, manager: web.Server, *, collector: Collector, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.collector = collector
        self._parser = FramingParser(
            self, kwargs["loop"], self._read_bufsize, limits=collector.limits,
            max_line_size=self.max_line_size, max_field_size=self.max_field_size, max_headers=self.max_headers,
            payload_exception=RequestPayloadError, auto_decompress=kwargs.get("auto_decompress", True))
        self.peer_eof = False  # the client half-closed: it sends nothing more
        self.answered = 0  # requests answered (aiohttp's _request_count: requests received)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol: bool | None
        # aiohttp closes at once; what the client sent before its FIN is answered first
        if self.answered >= self._request_count:
            return None  # nothing owed: close now
        self.peer_eof = True
        parser = self._parser
        if isinstance(parser, FramingParser):  # a body still arriving never will
            parser.fail_body(BadHttpMessage("the client closed before the end of the body"))
        if not self._messages:
            self.close()  # the request being answered is the last
        return True  # keep the transport to write the answers; start() closes it after the last

    def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                        start_time: float | None) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # not a coroutine itself (no frame more per request): aiohttp's, awaited at once, writes the
        # answer before the loop can deliver the client's FIN to eof_received
        self.answered += 1
        if (not request.content.is_eof() or not self.collector.ready or (self.peer_eof and not self._messages)) \
                and isinstance(resp, web.StreamResponse):  # (isinstance is slow: StreamResponse is an ABC)
            # the connection ends after this answer: the rest of the body is not read (or cannot be
            # trusted), the server is draining, or the client has half-closed
            resp.force_close()
        return _finish(self, request, resp, start_time)


class FramingServer(web.Server):
    """aiohttp's Server making FramingHandler connections."""

    def __init__(self, made: web.Server, collector: Collector) -> None:
        super().__init__(made.request_handler, request_factory=made.request_factory,
                         handler_cancellation=made.handler_cancellation, loop=made._loop, **made._kwargs)
        self.collector = collector

    def __call__(self) -> RequestHandler:
        return FramingHandler(self, collector=self.collector, loop=self._loop, **self._kwargs)


class FramingRunner(web.AppRunner):
    """aiohttp's AppRunner whose server makes FramingHandler connections."""

    def __init__(self, app: web.Application, collector: Collector, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.collector = collector

    async def _make_server(self) -> web.Server:
        return FramingServer(await super()._make_server(), self.collector)
