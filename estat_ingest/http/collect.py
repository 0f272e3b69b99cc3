"""The /collect logic as a plain function of method, path, query, headers, body and peer.

It does not know aiohttp or httptools. `Collector.handle` orchestrates: the method, the API key,
the size, whether the pipeline can take anything (draining, queue room), the body's events
(http/bodies.py decodes, splits and validates, and returns the events or the refusal), the client
IP and cookies, the records (each encoded to its JSONL line once), the enqueue, the status. The
HTTP front reads the body under the edge policy's limits (http/policy.py) and turns the `Reply`
into a response, so a front can be replaced by a leaner one without touching this.

Status codes (DESIGN.md §3): 200 accepted; 400 not UTF-8 JSON; 405 with Allow; 413 over
MAX_BODY_SIZE (exactly MAX is allowed); 503 with Retry-After when the queue is full, the server
is draining, or (`dlq_unavailable`) neither a sink nor its DLQ can take batches (DESIGN.md §2.8).
NDJSON is all-or-nothing. Every non-2xx moves `http_requests_rejected_total{reason}`.

Edge rules (docs/security.md): 401 with WWW-Authenticate when API_KEYS is set and the request
presents no key or a wrong one; `Content-Encoding` gzip/deflate/zstd decoded under the
MAX_BODY_SIZE cap (413 past it, 400 broken stream, 415 unknown encoding); JSON nested deeper than
MAX_JSON_DEPTH is 400; CORS headers for allowed origins; `GET /collect.gif` or `Accept: image/*`
answers a 1x1 GIF. Rejections are logged at most once per reason per LOG_EVERY_S seconds, so a
client repeating a bad request cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from estat_ingest.config import Settings
from estat_ingest.http.auth import WWW_AUTHENTICATE, ApiKeys, strip_api_key
from estat_ingest.http.bodies import BodyReader
from estat_ingest.http.clientip import ClientIp
from estat_ingest.http.cors import Cors
from estat_ingest.http.policy import (
    DLQ_UNAVAILABLE,
    DRAINING,
    LOG_EVERY_S,
    PIXEL_PATHS,
    QUEUE_FULL,
    SPOOL_REFUSALS,
    TEXT_HEADERS,
    InFlight,
    Limits,
    Refusal,
    Reply,
    too_large,
)
from estat_ingest.log import RateLimitedLog
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.queue import EventQueue
from estat_ingest.pipeline.record import IdGen, encode_line, encode_records

ALLOW = "GET, POST, OPTIONS"
# the smallest transparent 1x1 GIF (43 bytes), for <img> pixels
GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")

log = logging.getLogger("estat_ingest.http")


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


OK_REPLY = Reply(200)
PIXEL_REPLY = Reply(200, {"Content-Type": "image/gif", "Cache-Control": "no-store, max-age=0"}, GIF)
PREFLIGHT_REPLY = Reply(204, {"Allow": ALLOW})
ALLOW_HEADERS = {"Allow": ALLOW}
AUTH_MISSING = Refusal(401, "auth_missing", "API key required", WWW_AUTHENTICATE)
AUTH_INVALID = Refusal(401, "auth_invalid", "API key not valid", WWW_AUTHENTICATE)


class Collector:
    def __init__(
        self,
        settings: Settings,
        queue: EventQueue[tuple[float, bytes]],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics
        self.clock = clock
        self.ids = IdGen()
        self.client_ip = ClientIp(settings.trusted_proxies)
        self._client_ip = self.client_ip.lookup
        # the per-request counters (metrics.LoopCounter: added to on the loop, folded when read)
        self._requests = metrics.http_requests
        self._accepted_requests = metrics.http_accepted
        self._accepted_events = metrics.events_accepted
        self.accepting = False  # True from pipeline start until the pipeline drains (else 503)
        self.ready = False  # /ready: False before start-up completes and from the first signal
        self.limits = Limits.of(settings)  # what both HTTP fronts enforce (http/policy.py)
        self.inflight = InFlight(self.limits.in_flight)
        self._too_large = too_large(self.limits)
        self._cookie_allow = frozenset(settings.cookie_allowlist)
        self._cookie_rules = bool(self._cookie_allow) or not settings.store_cookies  # else the Cookie header as sent
        self.cors = Cors(settings.cors_allow_origins)
        # what a front calls per request: `handle`, or without CORS its body alone (one call fewer)
        self.answer: Callable[[str, str, str, Mapping[str, str], bytes, str | None], Reply] = (
            self.handle if self.cors.enabled else self._handle)
        self.keys = ApiKeys(settings.api_keys)
        self.reject_log = RateLimitedLog(LOG_EVERY_S)  # one line per rejection reason per interval
        self.bodies = BodyReader(settings)  # payload → events or refusal
        self.durable = settings.ack_mode == "durable"
        self._tally: list[Any] | None = None  # durable: [ticket, requests, events, reply] of the open ticket
        self.healthy: Callable[[], bool] = lambda: True  # /ready also needs this (durable: the spool writes)
        # the pipeline's dispatcher step, run now when the queue is full (Pipeline.relieve): True
        # when it made room
        self.relieve: Callable[[], bool] = lambda: False

    # ------------------------------------------------------------------ replies

    def refuse(self, refusal: Refusal) -> Reply:
        """The answer to a refused request: counted under its reason, logged (rate-limited)."""
        status, reason, message = refusal.status, refusal.reason, refusal.message
        m = self.metrics
        m.rejected.labels(reason).inc()
        if status == 413:
            m.http_too_large.inc()
        elif reason == "queue_full":
            m.http_queue_full.inc()
        suppressed = self.reject_log.allow(reason)
        if suppressed is not None:
            log.warning("request rejected", extra={
                "status": status, "reason": reason, "detail": message[:200], "suppressed": suppressed})
        return Reply(status, {**TEXT_HEADERS, **refusal.headers}, message.encode() + b"\n")

    def with_cors(self, reply: Reply, headers: Mapping[str, str]) -> Reply:
        """`reply` plus the CORS headers for the request's Origin, when it is allowed."""
        if not self.cors.enabled:
            return reply
        extra = self.cors.simple(headers.get("origin"))
        if extra is None:
            return reply
        return Reply(reply.status, {**reply.headers, **extra}, reply.body, reply.ticket)

    def settle(self, reply: Reply) -> Reply:
        """ACK_MODE=durable: the answer to write once `reply.ticket` is done — `reply` itself when
        the spool made every event durable, else a 503 (counted) that keeps its CORS headers."""
        ticket = reply.ticket
        assert ticket is not None and ticket.done()
        err = None if ticket.cancelled() else ticket.exception()
        if ticket.cancelled() or err is not None:
            why = getattr(err, "reason", "")  # spool/writer.py SpoolError.reason
            refused = self.refuse(SPOOL_REFUSALS.get(why) or SPOOL_REFUSALS["io_error"])
            return Reply(refused.status, {**reply.headers, **refused.headers}, refused.body)
        if reply.status == 200 and not reply.headers and not reply.body:
            return OK_REPLY
        return Reply(reply.status, reply.headers, reply.body)

    def _accepted(self, n: int, key_name: str) -> None:
        self._accepted_requests.pending += 1
        self._accepted_events.pending += n
        if key_name:
            self.metrics.api_key_requests.labels(key_name).inc()

    def _durable(self, ticket: asyncio.Future[None], key_name: str) -> None:
        """A request with an API key name: counted under it once the spool kept its events."""
        if not ticket.cancelled() and ticket.exception() is None:
            self.metrics.api_key_requests.labels(key_name).inc()

    def _durable_ticket(self, n: int, key_name: str) -> Reply:
        """The 200 that waits for the spool round covering this request's events (just offered).

        Requests of one loop iteration share their ticket (EventQueue.ticket) and so one Reply and
        one tally, counted as accepted only when the spool kept the events (a 503 is counted as
        refused): per request, a tally update instead of a future, a callback and a Reply."""
        ticket = self.queue.ticket()
        tally = self._tally
        if tally is None or tally[0] is not ticket:
            tally = self._tally = [ticket, 0, 0, Reply(200, OK_REPLY.headers, b"", ticket)]
            ticket.add_done_callback(functools.partial(self._durable_tally, tally))
        tally[1] += 1
        tally[2] += n
        if key_name:
            ticket.add_done_callback(functools.partial(self._durable, key_name=key_name))
        reply: Reply = tally[3]
        return reply

    def _durable_tally(self, tally: list[Any], ticket: asyncio.Future[None]) -> None:
        if self._tally is tally:
            self._tally = None
        if not ticket.cancelled() and ticket.exception() is None:
            self._accepted_requests.pending += tally[1]
            self._accepted_events.pending += tally[2]

    def too_large(self) -> Reply:
        return self.refuse(self._too_large)

    def full(self) -> Refusal:
        """Why the queue cannot take more: `DLQ_UNAVAILABLE` while the pipeline holds batches that
        neither a sink nor the DLQ took (fail closed, `EventQueue.held_reason`), else `QUEUE_FULL`."""
        return DLQ_UNAVAILABLE if self.queue.held_reason else QUEUE_FULL

    # ------------------------------------------------------------------ the function

    def handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        peer: str | None,
    ) -> Reply:
        """The answer to one request. `headers` finds a header by its lower-case name: aiohttp's
        multidict (any case), or the fast front's dict of lower-case names (a multidict when a name
        repeats). Every look-up here and in the parts it calls uses lower-case names."""
        if self.cors.enabled:
            if method == "OPTIONS" and headers.get("access-control-request-method"):
                extra = self.cors.preflight(headers.get("origin"))
                return Reply(204, {"Allow": ALLOW, **extra}) if extra else PREFLIGHT_REPLY
            return self.with_cors(self._handle(method, path, query, headers, body, peer), headers)
        return self._handle(method, path, query, headers, body, peer)

    def _handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        peer: str | None,
    ) -> Reply:
        pixel = False
        if method == "POST":
            payload = body
        elif method == "GET":
            pixel = path in PIXEL_PATHS or "image/" in headers.get("accept", "")
            payload = query.encode("utf-8", "surrogateescape")
        elif method == "OPTIONS":
            return PREFLIGHT_REPLY
        else:
            return self.refuse(Refusal(405, "method_not_allowed", f"method {method[:16]} not allowed", ALLOW_HEADERS))
        settings = self.settings
        key_name = ""
        if self.keys.enabled:
            candidate = self.keys.candidate(headers, query)
            if candidate is None:
                return self.refuse(AUTH_MISSING)
            found = self.keys.name_of(candidate)
            if found is None:
                return self.refuse(AUTH_INVALID)
            key_name = found
            if method == "GET":
                payload = strip_api_key(query).encode("utf-8", "surrogateescape")
        if len(payload) > settings.max_body_bytes:
            return self.too_large()
        if not self.accepting:
            return self.refuse(DRAINING)
        room = self.queue.room()
        if room <= 0 and not (self.relieve() and (room := self.queue.room()) > 0):
            # full: answer before decoding, validating and encoding anything (an overloaded server
            # should not spend its CPU on events it will refuse)
            self._requests.pending += 1
            return self.refuse(self.full())

        if method == "POST":
            get = headers.get
            events = self.bodies.post(payload, get("content-type", ""), get("content-encoding"), room)
            if events is QUEUE_FULL and self.relieve():  # more events than room: the dispatcher's step, once
                events = self.bodies.post(payload, get("content-type", ""), get("content-encoding"), self.queue.room())
        else:
            events = self.bodies.query(payload)
        if isinstance(events, Refusal):
            if events is QUEUE_FULL:  # an NDJSON body with more events than the queue has room for
                self._requests.pending += 1
                return self.refuse(self.full())
            return self.refuse(events)

        now = self.clock()
        get = headers.get
        xff = get("x-forwarded-for")
        if xff is not None:
            getall = getattr(headers, "getall", None)
            if getall is not None:  # several header lines are one list (RFC 9110 §5.3)
                xff = ",".join(getall("x-forwarded-for"))
        ip = self._client_ip(peer, xff, get("cloudfront-viewer-address"))
        ua = get("user-agent", "")
        cookie = get("cookie", "")
        if cookie and self._cookie_rules:
            cookie = self._cookie(cookie)
        # RECORD_API_KEY_NAME: one more field after `id` (v1 readers ignore it); never the key
        extra = b',"api_key_name":' + orjson.dumps(key_name) if key_name and settings.record_api_key_name else b""
        queue = self.queue
        n = len(events)
        if n == 1:  # most requests: one record, no head shared with others
            try:
                line = encode_line(now, ip, ua, cookie, events[0], self.ids, extra)
            except TypeError:
                # non-UTF-8 header bytes (aiohttp keeps them as surrogates, which JSON cannot hold):
                # replaced by U+FFFD, as v1 did, instead of failing the request
                line = encode_line(now, ip, _printable(ua), _printable(cookie), events[0], self.ids, extra)
            ok = queue.offer((now, line), len(line))  # its size as the pipeline charges it (a line)
        else:
            try:
                records, nbytes = encode_records(now, ip, ua, cookie, events, self.ids, extra)
            except TypeError:  # as above
                records, nbytes = encode_records(now, ip, _printable(ua), _printable(cookie), events, self.ids, extra)
            ok = queue.offer_many(records, nbytes)  # the lines' length, as the pipeline charges them
        self._requests.pending += 1  # http_requests_total: reached the enqueue step
        if not ok:
            return self.refuse(self.full() if not queue.closed else DRAINING)
        if self.durable:  # answered once the spool round that covers these events is fsynced
            reply = self._durable_ticket(n, key_name)
            return Reply(200, PIXEL_REPLY.headers, PIXEL_REPLY.body, reply.ticket) if pixel else reply
        self._accepted_requests.pending += 1
        self._accepted_events.pending += n
        if key_name:
            self.metrics.api_key_requests.labels(key_name).inc()
        return PIXEL_REPLY if pixel else OK_REPLY

    def _cookie(self, raw: str) -> str:
        if not raw or not self.settings.store_cookies:
            return ""
        if not self._cookie_allow:
            return raw
        kept = []
        for part in raw.split(";"):
            name = part.split("=", 1)[0].strip()
            if name in self._cookie_allow:
                kept.append(part.strip())
        return "; ".join(kept)
