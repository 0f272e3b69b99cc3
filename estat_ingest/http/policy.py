"""The HTTP edge policy both fronts apply (`HTTP_FRONT=fast|aiohttp`): the limits, the canned
answers, admission, the draining close and the protocol-error log.

A front parses HTTP/1.1 and writes bytes; what it limits, what it answers and when it closes come
from here and from `Collector` (collect.py, the /collect rules), so the two fronts cannot drift
apart. What still differs between them is what their parsers do with malformed HTTP
(docs/security.md, "the two HTTP fronts").

Limits (`Limits.of(settings)`, held by the Collector as `collector.limits`):
- a body over MAX_BODY_SIZE (exactly MAX is allowed) is 413, from Content-Length before any body
  byte is read, or as soon as a chunked body passes it; the rest is never read;
- the request line may be max(8190, MAX_BODY_SIZE + 4096) bytes, so a GET whose query is a payload
  of MAX_BODY_SIZE reaches /collect (and gets its 413 when it is over); past that bound the fast
  front answers 413 when there is a query, 431 otherwise, and aiohttp's parser 400;
- a header line (name + value) over MAX_HEADER_BYTES, or more than MAX_HEADERS headers, is refused
  (431 from the fast front, 400 from aiohttp's parser);
- headers not complete within HEADER_READ_TIMEOUT: the connection is closed without an answer;
  a body not complete within REQUEST_READ_TIMEOUT of its headers: 408, connection closed;
- an idle keep-alive connection is closed after KEEPALIVE_S, which is above an ALB's 60 s idle
  timeout so the balancer, not us, closes idle connections (no request is sent into a closing one);
- after a refusal the unread rest of the request is discarded for at most LINGER_S, so the client
  reads the answer instead of a reset, then the connection is closed;
- at shutdown, connections being closed may flush their last answers for CLOSE_FLUSH_S.

Admission (`InFlight`, `collector.inflight`): a /collect request counts from its complete headers
until it is answered; past MAX_IN_FLIGHT it is answered `OVERLOADED` (503, Retry-After) and its
connection closed, its body never read. Other routes are not capped. Shutdown waits for the count
to reach zero (bounded).

Draining: from the first signal `collector.ready` is False. /ready answers 503, and every answer
carries `Connection: close`, so keep-alive clients move to another instance while the requests
already inside /collect finish.

Requests refused before /collect runs (malformed HTTP, header limits) are counted in
`http_requests_rejected_total{reason}` and logged at most once per reason per LOG_EVERY_S
(`ProtocolErrors`), without a traceback unless it is our bug (`server_error`).

Framing (below; docs/security.md "HTTP/1.1 framing"): what both fronts do so that a proxy that
reuses a connection for other clients' requests (ALB, CloudFront, haproxy `http-reuse always`)
never reads a request boundary differently from the server, and never meets a close it was not
told about:
- an Upgrade request (or CONNECT) is a plain request: answered in HTTP/1.1, no protocol is ever
  switched to, its body (the h2c POST of `curl --http2`) read by its Content-Length or chunked
  framing and stored, and the connection goes on with the bytes after it;
- refused with 400 and a close: a second line of a framing-relevant header (`FRAMING_HEADERS`; RFC
  9112 §3.2 for Host, and a proxy may keep the other line), CONNECT with Content-Length or
  Transfer-Encoding (RFC 9110 §9.3.6: CONNECT has no content, so proxies disagree on where the next
  request starts), a Transfer-Encoding other than exactly `chunked` (`x, chunked`: a coding it does
  not understand, RFC 9112 §6.1), a percent-encoded path (never decoded: `/%6Detrics` would pass a
  proxy rule that blocks `/metrics`), a chunked body whose framing (chunk-size lines, extensions, trailers) takes
  more than `Limits.chunk_framing_bytes`;
- the connection is closed after an HTTP/1.0 request with Transfer-Encoding (RFC 9112 §6.1), after
  `Connection: close`, after HTTP/1.0 without keep-alive, after every refusal, while draining;
  whatever follows such a request on the connection is discarded, never parsed into a request;
- llhttp reads `HTTP/0.9` and `HTTP/2.0` request lines like HTTP/1.0 ones (keep-alive only when asked
  for, no Host needed); they are answered in HTTP/1.x, never with the version they claim;
- every answer after which the server closes says `Connection: close`; an HTTP/1.0 connection kept
  open is answered `Connection: keep-alive` (RFC 9112 appendix C.2.2);
- `100 Continue` only to an HTTP/1.1 `Expect: 100-continue` whose announced body is within
  MAX_BODY_SIZE, after every refusal that needs no body (RFC 9110 §10.1.1).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from estat_ingest.config import Settings
from estat_ingest.log import RateLimitedLog
from estat_ingest.metrics import CONTENT_TYPE, Metrics

KEEPALIVE_S = 75.0  # above an ALB's 60 s idle timeout
LINGER_S = 2.0  # aiohttp's default lingering_time (10 s) would let a trickling client hold a socket
CLOSE_FLUSH_S = 1.0  # a client that does not read its last answer must not hold the shutdown
LOG_EVERY_S = 10.0  # one log line per rejection reason per interval
# what a chunked body may spend on its framing beyond MAX_BODY_SIZE: llhttp reads chunk extensions
# and trailers without a bound, so without this one a 20 MB extension was accepted
CHUNK_FRAMING_SLACK = 16 * 1024

# ------------------------------------------------------------------------------------ routes

PIXEL_PATHS = frozenset({"/collect.gif", "/pixel.gif"})  # GET answers a 1x1 GIF (for <img>)
COLLECT_PATHS = frozenset({"/collect", *PIXEL_PATHS})  # any method: Collector.handle answers 405 itself
PLAIN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # GET and HEAD


@dataclass(frozen=True, slots=True)
class Limits:
    """What a request may be (see the module docstring); one object for both fronts."""

    body_bytes: int  # MAX_BODY_SIZE
    request_line_bytes: int  # max(8190, MAX_BODY_SIZE + 4096)
    header_line_bytes: int  # MAX_HEADER_BYTES, name + value
    headers: int  # MAX_HEADERS
    header_read_s: float  # HEADER_READ_TIMEOUT
    body_read_s: float  # REQUEST_READ_TIMEOUT
    in_flight: int  # MAX_IN_FLIGHT
    keepalive_s: float = KEEPALIVE_S
    linger_s: float = LINGER_S
    close_flush_s: float = CLOSE_FLUSH_S

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(body_bytes=s.max_body_bytes, request_line_bytes=max(8190, s.max_body_bytes + 4096),
                   header_line_bytes=s.max_header_bytes, headers=s.max_headers,
                   header_read_s=s.header_read_timeout_s, body_read_s=s.request_read_timeout_s,
                   in_flight=s.max_in_flight)

    @property
    def chunk_framing_bytes(self) -> int:
        """Bytes a chunked body may spend on its framing (size lines, extensions, trailers): as many
        as its content may have (MAX_BODY_SIZE), plus CHUNK_FRAMING_SLACK."""
        return self.body_bytes + CHUNK_FRAMING_SLACK


# ------------------------------------------------------------------------------------ answers

TEXT = "text/plain; charset=utf-8"
TEXT_HEADERS: Mapping[str, str] = {"Content-Type": TEXT}
RETRY_AFTER: Mapping[str, str] = {"Retry-After": "1"}


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer, independent of the front that writes it.

    With `ACK_MODE=durable` an accepted request's reply carries the `ticket` of its events: the
    front writes it only once the ticket is done, in request order, and asks the Collector for the
    final answer (`Collector.settle`: the same reply, or 503 if the spool could not keep them).
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    ticket: asyncio.Future[None] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A /collect refusal before it is answered: `Collector.refuse` counts it under `reason` (a
    bounded label), logs it (rate-limited) and answers `message` as text."""

    status: int
    reason: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)


# After a 503 for want of room (queue_full, dlq_unavailable) on a connection that stays open, the
# fast front reads that connection's next request only this much later. A client that retries at
# once (a load tester, an SDK without backoff) would otherwise have the server read, frame and
# refuse its bodies as fast as it sends them: under overload that work filled whole loop
# iterations, the uploaders that free the room got a turn per iteration, and NDJSON at 64
# connections fell to 0.57x of its 4-connection rate (145-153k events/s, 65-69k 503s per 9 s run;
# with the hold 206-221k and 2.7-3.9k; 0.01 s: 206k, 0.1 s: 171k, 0.2 s: 115k, the server idles).
# Nothing is refused for it and nothing is lost: the next request waits in the socket buffer
# (docs/tuning.md, "Overload").
FULL_HOLD_S = 0.03
# The fast front reads at most this many bytes per pass of the loop over the ready sockets; a
# connection whose data comes after that waits for the next pass, its reading paused
# (HttpConn.data_received). At 64 connections of 32 KB NDJSON bodies a pass that took every body
# lasted ≈ 15 ms, and the uploaders, which free the queue's room, get one turn per pass: the queue
# filled and bodies were read only to be refused (docs/tuning.md, "Overload"). Single events never
# reach it (64 connections of 500 B).
PASS_BYTES = 256 * 1024

OVERLOADED = Refusal(503, "overloaded", "too many requests in flight, retry later", RETRY_AFTER)
DRAINING = Refusal(503, "draining", "server is draining, retry later", RETRY_AFTER)
QUEUE_FULL = Refusal(503, "queue_full", "queue full, retry later", RETRY_AFTER)
# fail closed (DESIGN.md §2.8): neither a sink nor its DLQ can take batches; retrying at once cannot help
DLQ_UNAVAILABLE = Refusal(503, "dlq_unavailable", "the sink and the DLQ cannot take events now, retry later",
                          {"Retry-After": "5"})
# ACK_MODE=durable: the spool could not make the request's events durable (nothing of them is kept)
SPOOL_REFUSALS = {r.reason.removeprefix("spool_"): r for r in (
    Refusal(503, "spool_no_space", "events not stored: the spool disk is full, retry later", RETRY_AFTER),
    Refusal(503, "spool_read_only", "events not stored: the spool disk is read-only, retry later", RETRY_AFTER),
    Refusal(503, "spool_permission", "events not stored: the spool directory refused the write, retry later",
            RETRY_AFTER),
    Refusal(503, "spool_io_error", "events not stored: the spool disk failed, retry later", RETRY_AFTER),
    Refusal(503, "spool_lease_lost", "events not stored: this instance lost its spool lease, retry later",
            RETRY_AFTER),
    Refusal(503, "spool_shutdown", "events not stored: the server is shutting down, retry later", RETRY_AFTER),
)}
READ_TIMEOUT = Refusal(408, "read_timeout", "request body not received in time")
BAD_BODY = Refusal(400, "bad_body", "request body could not be read")  # broken framing, client gone


def too_large(limits: Limits) -> Refusal:
    return Refusal(413, "too_large", f"body larger than MAX_BODY_SIZE={limits.body_bytes} bytes")


# /health, /ready, /metrics and unknown routes, in aiohttp's words (its router answers 404 and 405
# itself; the fast front writes these)
HEALTH = Reply(200, TEXT_HEADERS, b"ok")
READY = Reply(200, TEXT_HEADERS, b"ready")
NOT_READY = Reply(503, TEXT_HEADERS, b"not ready")
NOT_FOUND = Reply(404, TEXT_HEADERS, b"404: Not Found")
PLAIN_NOT_ALLOWED = Reply(405, {"Content-Type": TEXT, "Allow": "GET,HEAD"}, b"405: Method Not Allowed")
# the fast front's answers to a bug in /collect and to what its parser refuses (aiohttp writes its own)
INTERNAL_ERROR = Reply(500, {}, b"internal error\n")
HEADER_TOO_LARGE = Reply(431, TEXT_HEADERS, b"request header fields too large\n")
MALFORMED = Reply(400, TEXT_HEADERS, b"malformed request\n")


def ready_reply(ready: bool) -> Reply:
    return READY if ready else NOT_READY


def metrics_reply(metrics: Metrics) -> Reply:
    """This process's registry."""
    return Reply(200, {"Content-Type": CONTENT_TYPE}, metrics.render())


# /metrics of a worker whose parent did not answer in time: a failed scrape (Prometheus: up 0), not
# the figures of one worker passed off as the group's
GROUP_UNAVAILABLE = Reply(503, TEXT_HEADERS, b"group metrics unavailable: the supervisor did not answer\n")
_group_log = RateLimitedLog(LOG_EVERY_S)


def metrics_answer(metrics: Metrics) -> Reply | asyncio.Future[Reply]:
    """/metrics on the public port: 404 when METRICS_ADDR serves it instead (`metrics.public`),
    this process's registry, or — a worker of `serve --workers N` — a future of the whole group's
    (`metrics.group`: the parent gathers and merges every worker's; never blocks the loop)."""
    if not metrics.public:
        return NOT_FOUND
    if metrics.group is None:
        return metrics_reply(metrics)
    return asyncio.ensure_future(group_reply(metrics.group))


async def group_reply(group: Callable[[], Awaitable[bytes]]) -> Reply:
    try:
        body = await group()
    except (OSError, TimeoutError) as err:
        suppressed = _group_log.allow("group")
        if suppressed is not None:
            logging.getLogger("estat_ingest.http").error(
                "group metrics: the supervisor did not answer", extra={"error": repr(err), "suppressed": suppressed})
        return GROUP_UNAVAILABLE
    if not body:  # the parent closed without an answer (its merge failed: it logged why)
        return GROUP_UNAVAILABLE
    return Reply(200, {"Content-Type": CONTENT_TYPE}, body)


# ------------------------------------------------------------------------------------ framing

# lower-case names of the headers a second line of which changes how a request is framed or read
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "content-type", "content-encoding"})
UNKNOWN_CODING = "Transfer-Encoding other than chunked"  # RFC 9112 §6.1: a coding it does not understand
ENCODED_PATH = "percent-encoded path"  # the refusal's detail (logged, never the client's bytes)
CONNECT_WITH_BODY = "CONNECT with Content-Length or Transfer-Encoding"
CHUNK_FRAMING_TOO_LARGE = "chunked framing (size lines, extensions, trailers) over the limit"


def duplicate_framing_header(names: Iterable[str]) -> str | None:
    """The first of `FRAMING_HEADERS` that `names` (a request's header names, one per line, any
    case) holds twice, else None: the request is refused (400, close)."""
    seen: set[str] = set()
    for name in names:
        key = name.lower()
        if key in FRAMING_HEADERS:
            if key in seen:
                return key
            seen.add(key)
    return None


def connect_with_body(method: str, headers: Mapping[str, str]) -> bool:
    """A CONNECT that announces a body: refused (400, close), never read."""
    return method == "CONNECT" and ("content-length" in headers or "transfer-encoding" in headers)


def unknown_coding(transfer_encoding: str) -> bool:
    """Transfer-Encoding other than exactly `chunked` (`x, chunked`, `chunked, x`, `identity`):
    refused (400, close) before its body is read. llhttp frames `x, chunked` by its last coding and
    would store a body it cannot decode; h11, the fuzzing oracle, refuses it too."""
    return transfer_encoding.strip(" \t").lower() != "chunked"


def closes_after(http10: bool, transfer_encoding: bool) -> bool:
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing, whatever its
    Connection header says; it is processed and the connection closed after it (the sender may have
    kept part of it back)."""
    return http10 and transfer_encoding


def announces_keep_alive(connection: str) -> bool:
    """Whether a request's `Connection` value asks for keep-alive: an HTTP/1.0 client keeps the
    connection only if the answer says `Connection: keep-alive` (RFC 9112 appendix C.2.2); to an
    HTTP/1.1 client it is harmless."""
    return "keep-alive" in connection.lower()


def send_continue(expect: str, http11: bool, length: int | None, limits: Limits) -> bool:
    """`100 Continue` before reading the body: only to HTTP/1.1 (RFC 9110 §10.1.1: an HTTP/1.0
    client does not know 1xx answers), only for `100-continue`, only when the announced body is
    within MAX_BODY_SIZE (it is answered 413 without being invited). The fronts ask this after
    every other refusal that needs no body (header limits, duplicates, admission)."""
    return http11 and expect.strip().lower() == "100-continue" and (length is None or length <= limits.body_bytes)


# ------------------------------------------------------------------------------------ admission


class InFlight:
    """Requests inside /collect: admitted up to `cap`; shutdown waits for the count to reach zero."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0
        self._zero: asyncio.Event | None = None

    def admit(self) -> bool:
        """Count a request in; False when that puts it over the cap (answer OVERLOADED). Either
        way the request is counted until `leave()`."""
        self.count += 1
        return self.count <= self.cap

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._zero is not None:
            self._zero.set()

    async def wait_zero(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bound, not a cancel scope
        if self.count == 0:
            return True
        self._zero = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._zero.wait()
        except TimeoutError:
            return False
        finally:
            self._zero = None
        return True


# ------------------------------------------------------------------------------------ protocol errors


class ProtocolErrors:
    """Requests refused before /collect runs (malformed HTTP, header limits): counted, and logged as
    one line at most once per reason per `every` seconds, for both fronts.

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
