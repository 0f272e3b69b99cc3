"""The /collect logic as a plain function of method, path, query, headers, body and peer.

It does not know aiohttp: it validates, builds records (each encoded to its JSONL line once),
enqueues them and picks the status. The HTTP front only reads the body under the size cap and
turns a `Reply` into a response, so it can be replaced by a leaner one without touching this.

Status codes (DESIGN.md §3): 200 accepted; 400 not UTF-8 JSON; 405 with Allow; 413 over
MAX_BODY_SIZE (exactly MAX is allowed); 503 with Retry-After when the queue is full or the server
is draining. NDJSON is all-or-nothing. Every non-2xx moves `http_requests_rejected_total{reason}`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from estat_ingest.config import Settings
from estat_ingest.http.clientip import ClientIp
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.queue import EventQueue
from estat_ingest.pipeline.record import IdGen, encode_record

ALLOW = "GET, POST, OPTIONS"
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines")
_TEXT = {"Content-Type": "text/plain; charset=utf-8"}


class InFlight:
    """Requests inside the /collect handler; shutdown waits for it to reach zero (bounded)."""

    def __init__(self) -> None:
        self.count = 0
        self._zero: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._zero is not None:
            self._zero.set()

    async def wait_zero(self, timeout: float) -> bool:
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


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


OK_REPLY = Reply(200)


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
        self.accepting = False  # True from pipeline start until the pipeline drains (else 503)
        self.ready = False  # /ready: False before start-up completes and from the first signal
        self.inflight = InFlight()
        self._cookie_allow = frozenset(settings.cookie_allowlist)

    # ------------------------------------------------------------------ replies

    def reject(self, status: int, reason: str, message: str, headers: Mapping[str, str] | None = None) -> Reply:
        m = self.metrics
        m.rejected.labels(reason).inc()
        if status == 413:
            m.http_too_large.inc()
        elif reason == "queue_full":
            m.http_queue_full.inc()
        h = dict(_TEXT)
        if headers:
            h.update(headers)
        return Reply(status, h, message.encode() + b"\n")

    def too_large(self) -> Reply:
        return self.reject(413, "too_large", f"body larger than MAX_BODY_SIZE={self.settings.max_body_bytes} bytes")

    def unavailable(self, reason: str) -> Reply:
        msg = "queue full, retry later" if reason == "queue_full" else "server is draining, retry later"
        return self.reject(503, reason, msg, {"Retry-After": "1"})

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
        if method == "OPTIONS":
            return Reply(204, {"Allow": ALLOW})
        if method == "GET":
            payload = query.encode("utf-8", "surrogateescape")
        elif method == "POST":
            payload = body
        else:
            return self.reject(405, "method_not_allowed", f"method {method[:16]} not allowed", {"Allow": ALLOW})
        if len(payload) > self.settings.max_body_bytes:
            return self.too_large()
        if not self.accepting:
            return self.unavailable("draining")

        ctype = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        ndjson = method == "POST" and ctype in NDJSON_TYPES
        if ndjson:
            bodies: list[str] = []
            for n, raw in enumerate(payload.split(b"\n"), 1):
                raw = raw.rstrip(b"\r")
                if not raw.strip():
                    continue
                text, err = self._validate(raw, True)
                if text is None:
                    return self.reject(400, err, f"line {n}: {err.replace('_', ' ')}")
                bodies.append(text)
            if not bodies:
                return self.reject(400, "empty", "empty NDJSON body")
        else:
            text, err = self._validate(payload, method == "POST")
            if text is None:
                return self.reject(400, err, err.replace("_", " "))
            bodies = [text]

        now = self.clock()
        ip = self.client_ip(peer, headers.get("X-Forwarded-For"), headers.get("CloudFront-Viewer-Address"))
        ua = headers.get("User-Agent", "")
        cookie = self._cookie(headers.get("Cookie", ""))
        next_id = self.ids.next
        records = [(now, encode_record(now, ip, ua, cookie, b, next_id(now))) for b in bodies]

        m = self.metrics
        m.http_requests.inc()
        ok = self.queue.offer(records[0]) if len(records) == 1 else self.queue.offer_many(records)
        if not ok:
            return self.unavailable("queue_full" if not self.queue.closed else "draining")
        m.http_accepted.inc()
        m.events_accepted.inc(len(records))
        return OK_REPLY

    def _validate(self, raw: bytes, is_json: bool) -> tuple[str | None, str]:
        """(payload text, "") or (None, reason)."""
        if is_json and self.settings.validate_json:
            if not raw.strip():
                return None, "empty"
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return None, "invalid_utf8"
                return None, "invalid_json"
            return raw.decode("utf-8"), ""
        try:
            return raw.decode("utf-8"), ""
        except UnicodeDecodeError:
            if self.settings.validate_json:
                return None, "invalid_utf8"
            return raw.decode("utf-8", "replace"), ""

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
