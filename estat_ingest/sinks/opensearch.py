"""OpenSearch sink: `_bulk` requests with item-level outcomes (one request per fresh batch).

Invariants
- Every document is sent with the `create` action and `_id` = the record's event id, so a retry
  (after a timeout, a dropped connection or an item-level 429) can never index it twice: a 409
  `version_conflict_engine_exception` on create means "already there" and counts as delivered.
- The HTTP status of the whole request decides first: transport errors, timeouts, 429 and 5xx
  retry; 401/403 and other 4xx reject (the engine writes the batch to the DLQ). With a 200, every
  item is read: 2xx and 409 are done, 429/5xx items are retried alone (`Result.remainder` holds
  only their records), other 4xx items (mapping errors) go to the DLQ as their original records
  with the index, status and error of each one in the DLQ meta (`Result.rejected`).
- A payload over the BULK limits (an old DLQ file, an S3 file replayed here) goes out as several
  requests in one attempt; a request that fails as a whole, or half the attempt's time spent,
  stops it with what was delivered reported and only the rest as the remainder.
- Counters are per item (`opensearch_items_total{outcome}`), never per request.
- The sink never sleeps or retries: the engine owns attempts (1 + OPENSEARCH_RETRIES), the
  per-attempt bound (OPENSEARCH_TIMEOUT) and backoff.
- JSON work (parsing records, building the NDJSON body, reading the response) stays on the loop,
  in slices, because orjson holds the GIL; gzip, hashing and DLQ decompression go to threads.

DLQ files of this sink are the same compressed JSONL record files as every other sink's (what the
engine spills); a replayed payload has `lines=None` and is decompressed here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson

from estat_ingest.config import Settings
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.encoder import compress, decompress
from estat_ingest.pipeline.keys import NAME_RE
from estat_ingest.sinks.base import Outcome, Payload, Result, Sink
from estat_ingest.sinks.sigv4 import NoCredentials, SigV4Signer

log = logging.getLogger("estat_ingest.sinks.opensearch")

SLICE = 500  # records per uninterrupted stretch of JSON work on the loop
MAX_REASON = 500  # characters of an item error reason kept in the DLQ meta
NODE_COOLDOWN_S = (2.0, 60.0)  # a failing node is skipped for 2 s, doubling up to 60 s
_NODE_DOWN_STATUSES = frozenset({502, 503, 504})


# ------------------------------------------------------------------------------------ nodes


class Nodes:
    """Round-robin over OPENSEARCH_URL; a node that failed is skipped until its cooldown ends."""

    def __init__(self, urls: Sequence[str], clock: Any = time.monotonic) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._clock = clock
        self._next = 0
        self._down_until = [0.0] * len(self.urls)
        self._streak = [0] * len(self.urls)

    def pick(self) -> str:
        now = self._clock()
        n = len(self.urls)
        for k in range(n):
            i = (self._next + k) % n
            if self._down_until[i] <= now:
                self._next = (i + 1) % n
                return self.urls[i]
        # every node is cooling down: try the one that comes back first rather than not at all
        i = min(range(n), key=lambda j: self._down_until[j])
        self._next = (i + 1) % n
        return self.urls[i]

    def failed(self, url: str) -> None:
        i = self.urls.index(url)
        self._streak[i] += 1
        base, cap = NODE_COOLDOWN_S
        cooldown = min(cap, base * 2 ** (self._streak[i] - 1))
        if self._streak[i] == 1 or self._down_until[i] <= self._clock():
            log.warning("opensearch node failing: skipped for a while",
                        extra={"sink": "opensearch", "node": url, "cooldown_seconds": cooldown})
        self._down_until[i] = self._clock() + cooldown

    def ok(self, url: str) -> None:
        i = self.urls.index(url)
        if self._streak[i]:
            log.info("opensearch node back", extra={"sink": "opensearch", "node": url})
        self._streak[i] = 0
        self._down_until[i] = 0.0


class LogLimiter:
    """At most one log line per key and interval; the next one says how many were suppressed."""

    def __init__(self, interval_s: float = 10.0, clock: Any = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None: do not log. Otherwise log, with this many suppressed since the last line."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


# ------------------------------------------------------------------------------------ documents


@dataclass(slots=True)
class Doc:
    line: bytes  # the original JSONL record (what goes back to the DLQ)
    index: str
    id: str
    body: bytes  # its two NDJSON lines: the `create` action and the document


@dataclass(slots=True)
class Bulk:
    docs: list[Doc] = field(default_factory=list)
    invalid: list[tuple[bytes, str]] = field(default_factory=list)  # (line, why) — records not indexable


@dataclass(slots=True)
class Tally:
    """What one attempt (one or several `_bulk` requests) did to its documents."""

    created: int = 0
    duplicate: int = 0
    retry: list[Doc] = field(default_factory=list)
    retry_reasons: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[bytes, dict[str, object]]] = field(default_factory=list)  # (record, its error)

    @property
    def done(self) -> int:
        return self.created + self.duplicate

    def retry_later(self, docs: Sequence[Doc], reason: str) -> None:
        self.retry.extend(docs)
        self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + len(docs)


class DocumentBuilder:
    """Record line → (`create` action, document). Pure; caches per second of receive time."""

    def __init__(self, index: str, tz: str, data_stream: bool) -> None:
        self.template = index
        self.tz = ZoneInfo(tz)
        self.data_stream = data_stream
        self._index_cache: dict[int, str] = {}
        self._iso_cache: dict[int, str] = {}

    def index_of(self, ts: int) -> str:
        if self.data_stream:
            return self.template
        name = self._index_cache.get(ts)
        if name is None:
            if len(self._index_cache) > 4096:
                self._index_cache.clear()
            name = datetime.fromtimestamp(ts, self.tz).strftime(self.template)
            self._index_cache[ts] = name
        return name

    def timestamp(self, ts: int, event_id: str) -> str:
        """ISO-8601 UTC with milliseconds: ts is whole seconds, the id's first 12 hex are epoch ms."""
        ms = ts * 1000
        try:
            id_ms = int(event_id[:12], 16)
        except ValueError:
            id_ms = -1
        if id_ms // 1000 == ts:
            ms = id_ms
        base = self._iso_cache.get(ts)
        if base is None:
            if len(self._iso_cache) > 4096:
                self._iso_cache.clear()
            base = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._iso_cache[ts] = base
        return f"{base}.{ms % 1000:03d}Z"

    @staticmethod
    def event_of(body: object) -> dict[str, Any]:
        """The parsed body when it is a JSON object; anything else (a GET query string, an array,
        a scalar, text when VALIDATE_JSON=false) as {"raw": <body as sent>}."""
        if isinstance(body, str):
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                return {"raw": body}
            if isinstance(parsed, dict):
                return parsed
            return {"raw": body}
        return {"raw": orjson.dumps(body).decode()}

    def add(self, bulk: Bulk, line: bytes) -> None:
        try:
            rec = orjson.loads(line)
            ts = int(rec["ts"])
            event_id = rec["id"]
            if not isinstance(event_id, str) or not event_id:
                raise ValueError("id")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            bulk.invalid.append((line, f"invalid record: {type(err).__name__}"))
            return
        index = self.index_of(ts)
        doc = {
            "@timestamp": self.timestamp(ts, event_id),
            "ip": rec.get("ip", ""),
            "user_agent": rec.get("user_agent", ""),
            "event": self.event_of(rec.get("body", "")),
            "id": event_id,
        }
        body = orjson.dumps({"create": {"_index": index, "_id": event_id}}, option=orjson.OPT_APPEND_NEWLINE) \
            + orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
        bulk.docs.append(Doc(line if line.endswith(b"\n") else line + b"\n", index, event_id, body))


def rejected_name(name: str, attempt: int) -> str:
    """A distinct DLQ name for the items rejected by one attempt, still a v1-style name."""
    m = NAME_RE.match(name)
    if m:
        return f"{m.group('unix')}_{m.group('instance')}-rej{attempt}_{m.group('counter')}{m.group('ext') or ''}"
    for ext in (".jsonl.gz", ".jsonl.zst"):
        if name.endswith(ext):
            return f"{name[:-len(ext)]}-rej{attempt}{ext}"
    return f"{name}-rej{attempt}"


def _prepare(body: bytes, gzip: bool, level: int, want_sha: bool) -> tuple[bytes, str]:
    data = compress(body, "gzip", level) if gzip and body else body
    return data, hashlib.sha256(data).hexdigest() if want_sha else ""


def _split_lines(raw: bytes) -> tuple[bytes, ...]:
    return tuple(line + b"\n" for line in raw.split(b"\n") if line.strip())


# ------------------------------------------------------------------------------------ the sink


class OpenSearchSink(Sink):
    name = "opensearch"
    wants_lines = True  # fresh batches come with their record lines: no decompression here

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, credentials: Any = None) -> None:
        s = settings
        self.settings = s
        self.attempts = 1 + s.opensearch_retries
        self.timeout_s = s.opensearch_timeout_s
        self.batching = (s.bulk_batch_size, s.bulk_batch_bytes, s.bulk_flush_interval_s)
        self.concurrency = s.bulk_max_parallel_flushes
        self.nodes = Nodes(s.opensearch_urls)
        self.builder = DocumentBuilder(s.opensearch_index, s.opensearch_index_tz, s.opensearch_data_stream)
        self.metrics = metrics
        self.signer = (SigV4Signer(s.opensearch_aws_service, s.aws_region, credentials)
                       if s.opensearch_aws_sigv4 else None)
        self._headers: dict[str, str] = {}
        if s.opensearch_username:  # built by hand: aiohttp.BasicAuth is deprecated in new aiohttp
            token = base64.b64encode(f"{s.opensearch_username}:{s.opensearch_password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._session: aiohttp.ClientSession | None = None
        self._logs = LogLimiter()  # failure logs: one line per kind per 10 s, with a suppressed count

    # ---------------------------------------------------------------- lifecycle

    def bind_metrics(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def start(self) -> None:
        s = self.settings
        ssl_ctx: ssl.SSLContext | bool
        if not s.opensearch_verify_tls:
            ssl_ctx = False
        else:
            ssl_ctx = await asyncio.to_thread(ssl.create_default_context, cafile=s.opensearch_ca_bundle or None)
        if self.signer is not None:
            await self.signer.start()
        connector = aiohttp.TCPConnector(ssl=ssl_ctx, limit=max(8, 2 * self.concurrency + 4),
                                         ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # a little under the engine's bound on the attempt, so the sink sees its own timeouts
            # (and marks the node) instead of being cancelled first
            timeout=aiohttp.ClientTimeout(total=self.timeout_s * 0.95),
            headers=self._headers,
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _count(self, outcome: str, n: int) -> None:
        if n and self.metrics is not None:
            self.metrics.opensearch_items.labels(outcome).inc(n)

    # ---------------------------------------------------------------- one request

    async def _request(self, method: str, path: str, body: bytes, headers: dict[str, str],
                       node: str | None = None, timeout_s: float | None = None) -> tuple[str, int, bytes]:
        """(node, status, response body); raises aiohttp.ClientError / OSError / TimeoutError."""
        assert self._session is not None, "start() was not called"
        node = node or self.nodes.pick()
        url = node + path
        s = self.settings
        want_sha = self.signer is not None
        if len(body) > 64 * 1024 and (s.opensearch_gzip or want_sha):
            data, sha = await asyncio.to_thread(_prepare, body, s.opensearch_gzip, s.gzip_level, want_sha)
        else:
            data, sha = _prepare(body, s.opensearch_gzip, s.gzip_level, want_sha)
        if s.opensearch_gzip and body:
            headers = {**headers, "Content-Encoding": "gzip"}
        if self.signer is not None:
            headers = await self.signer.sign(method, url, headers, sha)
        try:
            # (passing timeout=None would switch the session's timeout off: only pass a real one)
            extra: dict[str, Any] = {} if timeout_s is None else {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
            async with self._session.request(method, url, data=data or None, headers=headers, **extra) as resp:
                content = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.nodes.failed(node)
            raise
        if status in _NODE_DOWN_STATUSES:
            self.nodes.failed(node)
        else:
            self.nodes.ok(node)
        return node, status, content

    # ---------------------------------------------------------------- send

    async def _build(self, lines: Sequence[bytes]) -> Bulk:
        bulk = Bulk()
        add = self.builder.add
        for start in range(0, len(lines), SLICE):
            if start:
                await asyncio.sleep(0)  # let the loop breathe between slices
            for line in lines[start:start + SLICE]:
                add(bulk, line)
        return bulk

    def _chunks(self, docs: list[Doc]) -> list[list[Doc]]:
        """Requests of at most BULK_BATCH_SIZE documents and BULK_BATCH_BYTES_MB of records (the
        batcher's measure, so a fresh batch is always one request; a DLQ file written under larger
        limits, or an S3 file replayed here, is cut to fit)."""
        max_docs, max_bytes = self.settings.bulk_batch_size, self.settings.bulk_batch_bytes
        chunks: list[list[Doc]] = []
        cur: list[Doc] = []
        size = 0
        for d in docs:
            if cur and (len(cur) >= max_docs or size + len(d.line) > max_bytes):
                chunks.append(cur)
                cur, size = [], 0
            cur.append(d)
            size += len(d.line)
        if cur:
            chunks.append(cur)
        return chunks

    async def send(self, payload: Payload) -> Result:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        lines = payload.lines
        if lines is None:  # a DLQ replay: the records are only in the compressed file
            raw = await asyncio.to_thread(decompress, payload.data, payload.compression)
            lines = _split_lines(raw)
        bulk = await self._build(lines)
        attempt = payload.attempts + 1
        tally = Tally(rejected=[
            (line, {"_id": None, "index": None, "status": None, "type": "invalid_record", "reason": why})
            for line, why in bulk.invalid])
        self._count("rejected", len(tally.rejected))
        chunks = self._chunks(bulk.docs)
        deadline = t0 + self.timeout_s * 0.95  # answer before the engine's bound cancels the attempt
        for k, chunk in enumerate(chunks):
            if k and loop.time() - t0 > self.timeout_s / 2:
                # not enough time left for another request: keep the progress, send the rest next time
                tally.retry_later([d for c in chunks[k:] for d in c], "time_budget")
                break
            whole = await self._bulk_request(payload, attempt, chunk, tally, deadline)
            if whole is None:
                continue
            if not tally.done and not tally.retry and not tally.rejected:
                return whole  # nothing happened to any document: the payload stays as it is
            tally.retry_later([d for c in chunks[k:] for d in c], whole.reason)
            if whole.outcome is Outcome.REJECT:
                return await self._outcome(payload, attempt, tally, Outcome.REJECT, whole.reason)
            break
        reasons = tally.retry_reasons
        reason = max(reasons, key=lambda r: reasons[r]) if reasons else ""
        return await self._outcome(payload, attempt, tally, Outcome.RETRY, reason)

    async def _bulk_request(self, payload: Payload, attempt: int, docs: list[Doc], tally: Tally,
                            deadline: float) -> Result | None:
        """One `_bulk` request; item outcomes go to `tally`. A Result when the whole request failed."""
        body = b"".join(d.body for d in docs)
        left = max(0.05, deadline - asyncio.get_running_loop().time())
        try:
            node, status, content = await self._request(
                "POST", "/_bulk", body, {"Content-Type": "application/x-ndjson"}, timeout_s=left)
        except NoCredentials:
            return Result(Outcome.REJECT, "auth")
        except TimeoutError:
            return Result(Outcome.RETRY, "timeout")
        except aiohttp.ClientSSLError:  # certificate not trusted, name mismatch, handshake failure
            return Result(Outcome.RETRY, "tls")
        except (aiohttp.ClientError, OSError):
            return Result(Outcome.RETRY, "connection")
        except Exception as err:  # credential refresh and the like: transient until proven otherwise
            log.warning("opensearch request could not be made", extra={
                "sink": self.name, "batch": payload.name, "error": f"{type(err).__name__}: {err}"[:300]})
            return Result(Outcome.RETRY, "credentials")

        whole = self._classify_status(status)
        if whole is not None:
            suppressed = self._logs.allow(f"status:{status}")
            if suppressed is not None:
                log.warning("opensearch bulk request failed", extra={
                    "sink": self.name, "node": node, "batch": payload.name, "status": status,
                    "events": len(docs), "response": content[:300].decode("utf-8", "replace"),
                    "suppressed": suppressed})
            return whole
        try:
            response = orjson.loads(content)
            items = response["items"]
            errors = bool(response.get("errors", True))
            if not isinstance(items, list):
                raise TypeError("items")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return Result(Outcome.RETRY, "bad_response")

        if not errors and len(items) == len(docs):
            tally.created += len(docs)
            self._count("created", len(docs))
            return None
        created = duplicate = 0
        retry: list[Doc] = []
        reasons: dict[str, int] = {}
        rejected: list[tuple[bytes, dict[str, object]]] = []
        for i, doc in enumerate(docs):
            item = items[i] if i < len(items) else None
            info: dict[str, Any] = {}
            if isinstance(item, dict) and item:
                first = next(iter(item.values()))
                info = first if isinstance(first, dict) else {}
            st = info.get("status")
            if not isinstance(st, int):
                retry.append(doc)  # no answer for this document: it may or may not be there
                reasons["missing_item"] = reasons.get("missing_item", 0) + 1
            elif 200 <= st < 300:
                created += 1
            elif st == 409:
                duplicate += 1
            elif st == 429 or st >= 500:
                retry.append(doc)
                key = "throttled" if st == 429 else "server_error"
                reasons[key] = reasons.get(key, 0) + 1
            else:
                error = info.get("error")
                if not isinstance(error, dict):
                    error = {"type": "unknown", "reason": str(error)}
                rejected.append((doc.line, {
                    "_id": doc.id, "index": info.get("_index", doc.index), "status": st,
                    "type": error.get("type", "unknown"), "reason": str(error.get("reason", ""))[:MAX_REASON]}))
        self._count("created", created)
        self._count("duplicate", duplicate)
        self._count("retried", len(retry))
        self._count("rejected", len(rejected))
        tally.created += created
        tally.duplicate += duplicate
        tally.retry.extend(retry)
        for key, n in reasons.items():
            tally.retry_reasons[key] = tally.retry_reasons.get(key, 0) + n
        tally.rejected.extend(rejected)
        suppressed = self._logs.allow("partial") if rejected or retry else None
        if suppressed is not None:
            log.warning("opensearch bulk partially failed", extra={
                "sink": self.name, "node": node, "batch": payload.name, "attempt": attempt,
                "items_created": created, "items_duplicate": duplicate, "items_retried": len(retry),
                "items_rejected": len(rejected), "retry_reasons": reasons,
                "example_error": rejected[0][1] if rejected else None, "suppressed": suppressed})
        return None

    async def _outcome(self, payload: Payload, attempt: int, tally: Tally, failed: Outcome, reason: str
                       ) -> Result:
        """The attempt's Result: delivered count, remainder (only what is worth retrying, under the
        batch's name) and rejected records (under a name of their own), or OK."""
        s = self.settings
        level = s.zstd_level if payload.compression == "zstd" else s.gzip_level

        async def subset(name: str, lines: list[bytes], meta: dict[str, object]) -> Payload:
            data = await asyncio.to_thread(compress, b"".join(lines), payload.compression, level)
            return replace(payload, name=name, num_events=len(lines), data=data, lines=tuple(lines), meta=meta)

        rej_payload: Payload | None = None
        if tally.rejected:
            # its own name (one per attempt), so it never overwrites the batch's file or another
            # attempt's rejects; a replay of such a file that is rejected again yields another one,
            # which the replayer moves to rejected/ at once
            meta: dict[str, object] = {"item_errors": [e for _, e in tally.rejected],
                                       "rejected_from": payload.name}
            rej_payload = await subset(rejected_name(payload.name, attempt), [ln for ln, _ in tally.rejected], meta)
        done = tally.done
        if tally.retry:
            rem = await subset(payload.name, [d.line for d in tally.retry],
                               {"retried_items": len(tally.retry), "retry_reason": reason})
            return Result(failed, reason or "item_retry", remainder=rem, rejected=rej_payload, delivered=done)
        ok_reason = ("rejected_items" if not done else "partial") if rej_payload else ""
        return Result(Outcome.OK, ok_reason, rejected=rej_payload, delivered=done)

    @staticmethod
    def _classify_status(status: int) -> Result | None:
        """None for a 200 (read the items); otherwise the whole request's outcome."""
        if status == 200:
            return None
        if status == 429:
            return Result(Outcome.RETRY, "throttled")
        if status >= 500:
            return Result(Outcome.RETRY, "server_error")
        if status in (401, 403):
            return Result(Outcome.REJECT, "auth")
        if status == 413:
            return Result(Outcome.REJECT, "too_large")
        if 200 < status < 300:
            return Result(Outcome.RETRY, "bad_response")
        return Result(Outcome.REJECT, "client_error")

    # ---------------------------------------------------------------- start-up probe

    async def check(self) -> None:
        """Log clearly whether each node answers and accepts the credentials; never raises."""
        for url in self.nodes.urls:
            try:
                _, status, content = await self._request("GET", "/", b"", {}, node=url)
            except NoCredentials as err:
                log.error("opensearch: no AWS credentials for SigV4",
                          extra={"sink": self.name, "node": url, "error": str(err)})
                return
            except Exception as err:
                log.warning("opensearch unreachable at start-up (events go to the dlq until it is back)",
                            extra={"sink": self.name, "node": url,
                                   "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            if status in (401, 403):
                log.error("opensearch refused the credentials", extra={
                    "sink": self.name, "node": url, "status": status,
                    "response": content[:300].decode("utf-8", "replace")})
            elif status >= 500:
                log.warning("opensearch answers but is not healthy",
                            extra={"sink": self.name, "node": url, "status": status})
            else:
                version = ""
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    version = str(orjson.loads(content).get("version", {}).get("number", ""))
                log.info("opensearch reachable", extra={"sink": self.name, "node": url, "status": status,
                                                        "version": version})
