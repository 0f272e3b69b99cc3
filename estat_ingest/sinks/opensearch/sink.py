"""OpenSearch sink: `_bulk` requests with item-level outcomes (one request per fresh batch).

Invariants
- Every document is sent with the `create` action and `_id` = the record's event id, so a retry
  (after a timeout, a dropped connection or an item-level 429) can never index it twice: a 409
  `version_conflict_engine_exception` on create means "already there" and counts as delivered.
- The HTTP status of the whole request decides first: transport errors, timeouts, 429 and 5xx
  retry; 401/403, a closed or blocked index are outages (items.py: kept, retried later); other
  4xx reject (the engine writes the batch to the DLQ). With a 200, every
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
import fnmatch
import hashlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from estat_ingest.config import Settings, mask_userinfo
from estat_ingest.formats.codec import compress, decompress
from estat_ingest.log import RateLimitedLog
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import Batching, Outcome, Payload, Probe, Result, Sink, SinkSpec, outage
from estat_ingest.sinks.opensearch.documents import Bulk, Doc, DocumentBuilder, rejected_name, split_lines
from estat_ingest.sinks.opensearch.items import Tally, classify_status, read_items
from estat_ingest.sinks.opensearch.nodes import Nodes
from estat_ingest.sinks.opensearch.sigv4 import NoCredentials, SigV4Signer

log = logging.getLogger("estat_ingest.sinks.opensearch")

SLICE = 500  # records per uninterrupted stretch of JSON work on the loop
_NODE_DOWN_STATUSES = frozenset({502, 503, 504})


def _prepare(body: bytes, gzip: bool, level: int, want_sha: bool) -> tuple[bytes, str]:
    data = compress(body, "gzip", level) if gzip and body else body
    return data, hashlib.sha256(data).hexdigest() if want_sha else ""


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


def _split_lines(raw: bytes) -> tuple[bytes, ...]:
    return tuple(line + b"\n" for line in raw.split(b"\n") if line.strip())


class OpenSearchSink(Sink):
    def __init__(self, settings: Settings, metrics: Metrics | None = None, *, credentials: Any = None) -> None:
        s = settings
        # fresh batches come with their record lines (keeps_lines): no decompression here
        self.spec = SinkSpec(
            name="opensearch", attempts=1 + s.opensearch_retries, timeout_s=s.opensearch_timeout_s,
            batching=Batching(s.bulk_batch_size, s.bulk_batch_bytes, s.bulk_flush_interval_s),
            concurrency=s.bulk_max_parallel_flushes, keeps_lines=True)
        self.timeout_s = s.opensearch_timeout_s
        self.concurrency = s.bulk_max_parallel_flushes
        self.settings = s
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
        self._logs = RateLimitedLog()  # failure logs: one line per kind per 10 s, with a suppressed count

    # ---------------------------------------------------------------- lifecycle

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
            lines = split_lines(raw)
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
            if whole.outage:
                tally.outage = tally.outage or whole.reason
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
            return outage("auth", error="no AWS credentials for SigV4")
        except TimeoutError:
            return Result(Outcome.RETRY, "timeout", error=f"no answer within {left:.3g}s")
        except aiohttp.ClientSSLError as err:  # certificate not trusted, name mismatch, handshake failure
            return Result(Outcome.RETRY, "tls", error=_error_text(err))
        except (aiohttp.ClientError, OSError) as err:
            return Result(Outcome.RETRY, "connection", error=_error_text(err))
        except Exception as err:  # credential refresh and the like: transient until proven otherwise
            log.warning("opensearch request could not be made", extra={
                "sink": self.name, "batch": payload.name, "error": f"{type(err).__name__}: {err}"[:300]})
            return Result(Outcome.RETRY, "credentials")

        whole = classify_status(status, content)
        if whole is not None:
            whole = replace(whole, error=f"HTTP {status}: {content[:200].decode('utf-8', 'replace')}")
            suppressed = self._logs.allow(f"status:{status}")
            if suppressed is not None:
                log.warning("opensearch bulk request failed", extra={
                    "sink": self.name, "node": node, "batch": payload.name, "status": status,
                    "events": len(docs), "response": content[:300].decode("utf-8", "replace"),
                    "suppressed": suppressed})
            return whole
        items = read_items(content, docs)
        if isinstance(items, Result):
            return items
        self._count("created", items.created)
        self._count("duplicate", items.duplicate)
        self._count("retried", len(items.retry))
        self._count("rejected", len(items.rejected))
        tally.add(items)
        suppressed = self._logs.allow("partial") if items.rejected or items.retry else None
        if suppressed is not None:
            log.warning("opensearch bulk partially failed", extra={
                "sink": self.name, "node": node, "batch": payload.name, "attempt": attempt,
                "items_created": items.created, "items_duplicate": items.duplicate,
                "items_retried": len(items.retry), "items_rejected": len(items.rejected),
                "retry_reasons": items.reasons,
                "example_error": items.rejected[0][1] if items.rejected else None, "suppressed": suppressed})
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
            if tally.outage:  # the index or cluster refuses everything: what is left waits, never set aside
                reason = tally.outage
            rem = await subset(payload.name, [d.line for d in tally.retry],
                               {"retried_items": len(tally.retry), "retry_reason": reason})
            return Result(failed, reason or "item_retry", remainder=rem, rejected=rej_payload, delivered=done,
                          outage=bool(tally.outage))
        ok_reason = ("rejected_items" if not done else "partial") if rej_payload else ""
        return Result(Outcome.OK, ok_reason, rejected=rej_payload, delivered=done)

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

    # ---------------------------------------------------------------- validate --check-sinks

    def target_of(self, payload: Payload) -> str:
        kind = "data stream" if self.settings.opensearch_data_stream else "index"
        return f"opensearch {kind} {self.builder.index_of(int(payload.first_ts))} (of the batch's first event)"

    async def probe(self) -> Probe:
        """Read-only, because a probe document would stay in the index (the server may create
        documents, never delete them): `GET /` on every node (reachable, credentials accepted,
        healthy), then on the index a batch would go to now: not blocked for writes and not
        closed if it exists; a data stream that does not exist yet needs an index template with
        `data_stream` that matches it."""
        problems: list[str] = []
        good: list[str] = []
        for url in self.nodes.urls:
            shown = mask_userinfo(url)
            try:
                _, status, content = await self._request("GET", "/", b"", {}, node=url, timeout_s=self.timeout_s)
            except NoCredentials as err:
                return Probe("", (f"no AWS credentials for SigV4 (OPENSEARCH_AWS_SIGV4=true): {err}",))
            except TimeoutError:
                problems.append(f"{shown}: no answer within OPENSEARCH_TIMEOUT={self.timeout_s:g}s")
                continue
            except Exception as err:
                problems.append(f"{shown}: unreachable: {_error_text(err)}")
                continue
            if status in (401, 403):
                who = ("the SigV4 signature (AWS credentials)" if self.signer is not None else
                       "OPENSEARCH_USERNAME/OPENSEARCH_PASSWORD" if self.settings.opensearch_username else
                       "an anonymous request (no OPENSEARCH_USERNAME)")
                problems.append(f"{shown}: refused {who}: HTTP {status}: {_snippet(content)}")
            elif status >= 400 and status != 404:  # Serverless has no GET /: its 404 is an answer
                problems.append(f"{shown}: not healthy: HTTP {status}: {_snippet(content)}")
            else:
                good.append(url)
        if not good:
            return Probe("", tuple(problems))
        index_problems, index_checked = await self._probe_index(good[0])
        checked = f"GET / answered by {', '.join(mask_userinfo(u) for u in good)}; {index_checked}"
        return Probe(checked, tuple(problems + index_problems))

    async def _probe_index(self, node: str) -> tuple[list[str], str]:
        """(problems, what was found) about the index (or data stream) a batch would go to now."""
        name = self.builder.index_of(int(time.time()))
        kind = "data stream" if self.settings.opensearch_data_stream else "index"
        path = f"/{name}?filter_path=*.settings.index.blocks,*.settings.index.verified_before_close"
        try:
            _, status, content = await self._request("GET", path, b"", {}, node=node, timeout_s=self.timeout_s)
        except Exception as err:
            return [f"{kind} {name}: GET failed: {_error_text(err)}"], ""
        if status in (401, 403):
            return [], (f"{kind} {name} not inspected (HTTP {status}: no permission to read its settings); "
                        "a missing write permission shows on the first batch")
        if status == 404:
            if not self.settings.opensearch_data_stream:
                return [], f"index {name} does not exist yet: the first batch creates it"
            return await self._probe_data_stream_template(node, name)
        if status >= 500:
            return [f"{kind} {name}: GET answered HTTP {status}: {_snippet(content)}"], ""
        if status >= 400:  # not an API this cluster offers (Serverless): nothing to conclude
            return [], f"{kind} {name} not inspected (HTTP {status}: {_snippet(content)[:80]})"
        try:
            found = orjson.loads(content) if content.strip() else {}
        except orjson.JSONDecodeError:
            found = {}
        problems = []
        for index, info in found.items() if isinstance(found, dict) else ():
            settings = info.get("settings", {}).get("index", {}) if isinstance(info, dict) else {}
            blocks = settings.get("blocks", {}) if isinstance(settings, dict) else {}
            on = sorted(b for b, v in blocks.items() if str(v).lower() == "true" and b != "read"
                        and b != "metadata") if isinstance(blocks, dict) else []
            if on:
                problems.append(f"{kind} {name}: {index} refuses writes: "
                                + ", ".join(f"index.blocks.{b}=true" for b in on))
            elif str(settings.get("verified_before_close", "")).lower() == "true":
                problems.append(f"{kind} {name}: {index} is closed")
        return problems, f"{kind} {name} exists and takes writes"

    async def _probe_data_stream_template(self, node: str, name: str) -> tuple[list[str], str]:
        """A data stream is created by its first write only if an index template with
        `data_stream` matches its name (the one with the highest priority decides)."""
        try:
            _, status, content = await self._request("GET", "/_index_template", b"", {}, node=node,
                                                     timeout_s=self.timeout_s)
        except Exception as err:
            return [f"data stream {name}: GET /_index_template failed: {_error_text(err)}"], ""
        if status >= 400:
            return [], (f"data stream {name} does not exist yet; its index template not inspected "
                        f"(HTTP {status})")
        best: tuple[int, str, bool] | None = None
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            for t in orjson.loads(content).get("index_templates", []):
                body = t.get("index_template", {})
                if any(fnmatch.fnmatchcase(name, p) for p in body.get("index_patterns", [])):
                    cand = (int(body.get("priority", 0) or 0), str(t.get("name", "")), "data_stream" in body)
                    if best is None or cand[0] > best[0]:
                        best = cand
        if best is None or not best[2]:
            which = "no index template matches it" if best is None else f"index template {best[1]!r} has no data_stream"
            return [f"data stream {name} does not exist and {which}: the first batch would be refused "
                    "(create an index template with \"data_stream\": {} for it)"], ""
        return [], f"data stream {name} does not exist yet: index template {best[1]!r} creates it"


def _snippet(content: bytes) -> str:
    return content[:200].decode("utf-8", "replace").strip()
