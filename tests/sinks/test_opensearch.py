"""The OpenSearch sink through the real engine against a local `_bulk` server (tests/fake_opensearch.py).

Every test checks data: which `_id`s are indexed, how many times, in which index, which records went
to the DLQ with which reason, and the per-item counters.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import orjson
import pytest
from botocore.credentials import Credentials
from multidict import CIMultiDict

from estat_ingest.config import Settings
from estat_ingest.delivery import Backoff
from estat_ingest.dlq.store import META_SUFFIX
from estat_ingest.formats.codec import decompress
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.base import Outcome, Payload
from estat_ingest.sinks.opensearch import Nodes, OpenSearchSink, rejected_name
from tests.fake_opensearch import FakeOpenSearch, self_signed, server_tls
from tests.helpers import free_port

FAST = Backoff(0.01, 0.05)
TS = 1764805500.0  # 2025-12-03T23:45:00Z = 2025-12-04 08:45 in Asia/Seoul


@pytest.fixture
def fake() -> Iterator[FakeOpenSearch]:
    with FakeOpenSearch() as f:
        yield f


def settings(tmp_path: Path, urls: tuple[str, ...], **kw: Any) -> Settings:
    base: dict[str, Any] = {"dlq_dir": str(tmp_path / "dlq"), "instance_id": "t", "sinks": ("opensearch",),
                            "opensearch_urls": urls, "opensearch_retries": 2, "opensearch_timeout_s": 5.0,
                            "dlq_max_age_s": 0.0}  # TS is a fixed past time: no TTL here
    base.update(kw)
    return Settings.from_env({}, **base)


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels or None) or 0.0


def items(m: Metrics) -> dict[str, float]:
    return {o: sample(m, "opensearch_items_total", outcome=o) for o in ("created", "duplicate", "retried", "rejected")}


def collector(pipe: Pipeline, ts: float = TS) -> Collector:
    c = Collector(pipe.settings, pipe.queue, pipe.metrics, clock=lambda: ts)
    c.accepting = True
    return c


def post(c: Collector, body: dict[str, Any] | bytes, ua: str = "test-agent/1.0") -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    res = c.handle("POST", "/collect", "", CIMultiDict({"User-Agent": ua}), raw, "198.51.100.7")
    assert res.status == 200


def dlq_entries(root: Path) -> list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(META_SUFFIX) and not p.name.startswith("."):
            meta = orjson.loads((p.parent / (p.name + META_SUFFIX)).read_bytes())
            recs = [orjson.loads(x) for x in decompress(p.read_bytes(), meta["compression"]).splitlines()]
            out.append((p, meta, recs))
    return out


def top_files(d: Path) -> list[Path]:
    """DLQ data files waiting for replay (not those moved to rejected/ or corrupt/)."""
    return [p for p in d.glob("*") if p.is_file() and not p.name.endswith(META_SUFFIX)
            and not p.name.startswith(".")]


async def run(s: Settings, m: Metrics, feed: Any, until: Any = None, **sink_kw: Any) -> tuple[Pipeline, Any]:
    """Feed events, deliver them all; then, with `until`, let the DLQ replayer work until it holds."""
    sink = OpenSearchSink(s, m, **sink_kw)
    pipe = Pipeline(s, m, [sink], backoff=FAST)
    await pipe.start()
    try:
        feed(collector(pipe))
        await pipe.flush_and_wait()
        if until is not None:
            async with asyncio.timeout(30):
                while not until():
                    await asyncio.sleep(0.02)
    finally:
        report = await pipe.drain(5)
    return pipe, report


# ------------------------------------------------------------------------------------ documents


def test_document_shape_index_name_and_id(tmp_path: Path, fake: FakeOpenSearch) -> None:
    s = settings(tmp_path, (fake.url,), opensearch_index="events-%Y.%m.%d", opensearch_index_tz="Asia/Seoul")
    m = Metrics()

    def feed(c: Collector) -> None:
        for i in range(10):
            post(c, {"i": i, "nested": {"k": [1, 2]}})
        post(c, b"[1, 2, 3]")
        ua = CIMultiDict({"User-Agent": "test-agent/1.0"})
        assert c.handle("GET", "/collect", "a=1&b=two", ua, b"", "198.51.100.7").status == 200

    _, report = asyncio.run(run(s, m, feed))
    docs = fake.all_docs()
    index_of = fake.index_of()
    assert len(docs) == 12 and report.delivered_events == 12 and report.spilled_events == 0
    want_index = datetime.fromtimestamp(TS, ZoneInfo("Asia/Seoul")).strftime("events-%Y.%m.%d")
    assert want_index == "events-2025.12.04"  # the UTC date would be 2025.12.03
    assert set(index_of.values()) == {want_index}
    events = sorted((d["event"] for d in docs.values()), key=orjson.dumps)
    assert {"raw": "a=1&b=two"} in events and {"raw": "[1, 2, 3]"} in events
    assert sorted(e["i"] for e in events if "i" in e) == list(range(10))
    for _id, d in docs.items():
        assert list(d) == ["@timestamp", "ip", "user_agent", "event", "id"]  # no cookie in the index
        assert d["id"] == _id and d["ip"] == "198.51.100.7" and d["user_agent"] == "test-agent/1.0"
        ms = int(_id[:12], 16)
        assert d["@timestamp"] == datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
            f"{ms % 1000:03d}Z"
        assert d["@timestamp"].startswith("2025-12-03T23:45:00.")
    assert all(n == 1 for n in fake.indexed.values())
    [req] = fake.bulk_requests()
    assert req.headers["Content-Type"] == "application/x-ndjson" and "Content-Encoding" not in req.headers
    assert items(m) == {"created": 12, "duplicate": 0, "retried": 0, "rejected": 0}
    assert sample(m, "events_delivered_total", sink="opensearch") == 12


def test_data_stream_mode_creates_into_the_stream_name_and_gzip_body(tmp_path: Path, fake: FakeOpenSearch) -> None:
    s = settings(tmp_path, (fake.url,), opensearch_data_stream=True, opensearch_index="logs-estat",
                 opensearch_gzip=True)
    m = Metrics()
    asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(30)]))
    assert set(fake.index_of().values()) == {"logs-estat"} and len(fake.all_docs()) == 30
    [req] = fake.bulk_requests()
    assert req.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(req.raw).count(b'{"create":{"_index":"logs-estat","_id":') == 30


# ------------------------------------------------------------------------------------ item level


def test_item_429_retried_alone_item_400_to_dlq_with_reasons_counters_exact(
        tmp_path: Path, fake: FakeOpenSearch) -> None:
    fake.throttle_every = 4  # first sight: items 0, 4, 8, … of the request get an item-level 429
    bad = {3, 8, 20, 50, 97}  # 8 and 20 are throttled first, then rejected on the retry
    s = settings(tmp_path, (fake.url,))
    m = Metrics()
    dlq = tmp_path / "dlq" / "opensearch"

    def feed(c: Collector) -> None:
        for i in range(100):
            post(c, {"i": i, "reject": True} if i in bad else {"i": i})

    # the replayer sends each rejects file once more, gets 400s again and moves it to rejected/
    _, report = asyncio.run(run(s, m, feed, until=lambda: not top_files(dlq) and (dlq / "rejected").is_dir()
                                and len(top_files(dlq / "rejected")) == 2))
    first, *rest = fake.bulk_requests()
    assert len(first.ids) == 100
    throttled = [first.ids[k] for k in range(0, 100, 4)]
    # only the failed items were sent again, in order (replays of rejects files may interleave)
    assert [r.ids for r in rest if len(r.ids) > 3] == [throttled]
    replays = [r for r in rest if len(r.ids) <= 3]
    bad_ids = {first.ids[i] for i in bad}
    assert sorted(len(r.ids) for r in replays) == [2, 3] and {i for r in replays for i in r.ids} == bad_ids
    docs = fake.all_docs()
    assert {d["event"]["i"] for d in docs.values()} == set(range(100)) - bad
    assert all(n == 1 for n in fake.indexed.values()) and len(fake.indexed) == 95
    # per item and per attempt: 5 rejects on the fresh path, the same 5 once more on replay
    assert items(m) == {"created": 95, "duplicate": 0, "retried": 25, "rejected": 10}
    assert report.delivered_events == 95 and report.spilled_events == 5
    entries = dlq_entries(tmp_path / "dlq")
    assert {p.parent for p, _, _ in entries} == {dlq / "rejected"} and len(entries) == 2
    by_i: dict[int, dict[str, Any]] = {}
    for p, meta, recs in entries:
        assert meta["num_events"] == len(recs) and "-rej" in p.name
        errors = {e["_id"]: e for e in meta["item_errors"]}
        for r in recs:  # the original record, as the server accepted it
            assert list(r) == ["ts", "ip", "user_agent", "cookie", "body", "id"]
            e = errors[r["id"]]
            assert e["status"] == 400 and e["type"] == "mapper_parsing_exception"
            assert e["index"].startswith("events-") and "failed to parse" in e["reason"]
            by_i[orjson.loads(r["body"])["i"]] = e
    assert set(by_i) == bad
    assert sample(m, "dlq_events_enqueued_total", sink="opensearch") == 5


def test_everything_rejected_goes_to_rejected_without_churn(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """A batch whose items are all rejected: one rejects file, replayed once, then parked in rejected/."""
    s = settings(tmp_path, (fake.url,))
    m = Metrics()
    dlq = tmp_path / "dlq" / "opensearch"
    asyncio.run(run(s, m, lambda c: [post(c, {"i": i, "reject": True}) for i in range(7)],
                    until=lambda: not top_files(dlq) and bool(top_files(dlq / "rejected"))))
    [(p, meta, recs)] = dlq_entries(tmp_path / "dlq")
    assert p.parent.name == "rejected" and len(recs) == 7
    assert sorted(e["_id"] for e in meta["item_errors"]) == sorted(r["id"] for r in recs)
    assert fake.all_docs() == {}
    assert [len(r.ids) for r in fake.bulk_requests()] == [7, 7]  # fresh + one replay, never again
    assert items(m)["rejected"] == 14 and items(m)["created"] == 0


def test_dlq_replay_payload_without_lines(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """A DLQ file is a compressed JSONL record file; a replay hands the sink `lines=None`."""
    fake.down = True
    s = settings(tmp_path, (fake.url,), opensearch_retries=0)
    m = Metrics()
    asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(40)]))
    [(p, meta, recs)] = dlq_entries(tmp_path / "dlq")
    assert meta["reason"] == "failed" and len(recs) == 40 and fake.all_docs() == {}
    fake.down = False

    async def replay() -> Any:
        sink = OpenSearchSink(s, metrics=m)
        await sink.start()
        try:
            payload = Payload(name=p.name, partition=meta["partition"], num_events=meta["num_events"],
                              data=p.read_bytes(), compression=meta["compression"], first_ts=meta["first_ts"],
                              attempts=meta["attempts"])
            return await sink.send(payload)
        finally:
            await sink.aclose()

    result = asyncio.run(replay())
    assert result.outcome is Outcome.OK and result.delivered == 40
    assert sorted(d["event"]["i"] for d in fake.all_docs().values()) == list(range(40))


# ------------------------------------------------------------------------------------ whole request


def test_whole_request_503_retries_then_succeeds_and_down_goes_to_dlq(tmp_path: Path, fake: FakeOpenSearch) -> None:
    fake.status_script = [503, 429]
    s = settings(tmp_path / "a", (fake.url,), opensearch_retries=2)
    m = Metrics()
    asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(20)]))
    assert [r.status for r in fake.bulk_requests()] == [503, 429, 200]
    assert len(fake.all_docs()) == 20 and dlq_entries(tmp_path / "a" / "dlq") == []
    assert sample(m, "upload_attempts_total", sink="opensearch", outcome="retry", reason="server_error") == 1
    assert sample(m, "upload_attempts_total", sink="opensearch", outcome="retry", reason="throttled") == 1

    fake.down = True
    s = settings(tmp_path / "b", (fake.url,), opensearch_retries=1)
    m = Metrics()
    before = len(fake.bulk_requests())
    asyncio.run(run(s, m, lambda c: [post(c, {"i": 100 + i}) for i in range(20)],
                    until=lambda: bool(top_files(tmp_path / "b" / "dlq" / "opensearch"))))
    # 1 + OPENSEARCH_RETRIES fresh attempts (then the replayer may probe the file while it is down)
    assert [r.status for r in fake.bulk_requests()[before:before + 2]] == [503, 503]
    [(_, meta, recs)] = dlq_entries(tmp_path / "b" / "dlq")
    assert meta["reason"] == "failed" and sorted(orjson.loads(r["body"])["i"] for r in recs) == \
        list(range(100, 120))
    assert items(m) == {"created": 0, "duplicate": 0, "retried": 0, "rejected": 0}


def test_connection_drop_after_indexing_is_retried_without_duplicates(tmp_path: Path, fake: FakeOpenSearch) -> None:
    fake.drop_script = [True]  # indexes the batch, then closes the connection without answering
    s = settings(tmp_path, (fake.url,))
    m = Metrics()
    _, report = asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(50)]))
    reqs = fake.bulk_requests()
    assert len(reqs) == 2 and reqs[0].ids == reqs[1].ids
    assert len(fake.all_docs()) == 50 and all(n == 1 for n in fake.indexed.values())
    assert fake.create_calls.total() == 100
    assert items(m) == {"created": 0, "duplicate": 50, "retried": 0, "rejected": 0}
    assert report.delivered_events == 50 and dlq_entries(tmp_path / "dlq") == []
    assert sample(m, "upload_attempts_total", sink="opensearch", outcome="retry", reason="connection") == 1


def test_slow_response_times_out_and_the_retry_never_duplicates(tmp_path: Path, fake: FakeOpenSearch) -> None:
    fake.delay_script = [1.0]  # the first request is answered after the attempt's timeout (and indexed)
    s = settings(tmp_path, (fake.url,), opensearch_timeout_s=0.3)
    m = Metrics()
    _, report = asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(30)]))
    assert report.delivered_events == 30 and report.spilled_events == 0
    assert sample(m, "upload_attempts_total", sink="opensearch", outcome="retry", reason="timeout") == 1
    assert len(fake.bulk_requests()) == 2
    assert len(fake.all_docs()) == 30 and all(n == 1 for n in fake.indexed.values())


def test_basic_auth_sent_and_401_is_an_outage_to_the_dlq_without_retry(tmp_path: Path, fake: FakeOpenSearch) -> None:
    fake.basic_auth = ("ingest", "s3cret")
    s = settings(tmp_path / "bad", (fake.url,), opensearch_username="ingest", opensearch_password="wrong")
    m = Metrics()
    dlq = tmp_path / "bad" / "dlq" / "opensearch"
    asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(5)],
                    until=lambda: bool(top_files(dlq) or top_files(dlq / "rejected"))))
    statuses = [r.status for r in fake.bulk_requests()]
    assert statuses[0] == 401 and set(statuses) == {401} and len(statuses) <= 2  # fresh: one attempt, no retry
    [(_, meta, recs)] = dlq_entries(tmp_path / "bad" / "dlq")
    assert meta["reason"] == "outage" and len(recs) == 5  # refused credentials say nothing about the batch
    assert sample(m, "upload_attempts_total", sink="opensearch", outcome="reject", reason="auth") >= 1

    s = settings(tmp_path / "good", (fake.url,), opensearch_username="ingest", opensearch_password="s3cret")
    asyncio.run(run(s, Metrics(), lambda c: [post(c, {"i": 10 + i}) for i in range(5)]))
    assert sorted(d["event"]["i"] for d in fake.all_docs().values()) == list(range(10, 15))
    assert fake.bulk_requests()[-1].headers["Authorization"].startswith("Basic ")


def test_startup_check_logs_unreachable_and_refused_credentials(
        tmp_path: Path, fake: FakeOpenSearch, caplog: pytest.LogCaptureFixture) -> None:
    fake.basic_auth = ("ingest", "s3cret")
    dead = f"http://127.0.0.1:{free_port()}"
    s = settings(tmp_path, (dead, fake.url), opensearch_username="ingest", opensearch_password="wrong")

    async def main() -> None:
        sink = OpenSearchSink(s)
        await sink.start()
        try:
            await sink.check()
        finally:
            await sink.aclose()

    with caplog.at_level(logging.INFO, logger="estat_ingest.sinks.opensearch"):
        asyncio.run(main())
    msgs = {(r.getMessage(), getattr(r, "node", None)) for r in caplog.records}
    assert ("opensearch unreachable at start-up (events go to the dlq until it is back)", dead) in msgs
    assert ("opensearch refused the credentials", fake.url) in msgs


def test_tls_verified_by_default_ca_bundle_trusted_and_verification_can_be_turned_off(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with FakeOpenSearch(ssl_context=server_tls(cert, key)) as fake:
        # system CAs only: the self-signed certificate is refused, nothing reaches the server
        s = settings(tmp_path / "a", (fake.url,), opensearch_retries=0)
        m = Metrics()
        asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(5)]))
        assert fake.bulk_requests() == [] and fake.all_docs() == {}
        assert sample(m, "upload_attempts_total", sink="opensearch", outcome="retry", reason="tls") >= 1
        [(_, meta, recs)] = dlq_entries(tmp_path / "a" / "dlq")
        assert meta["reason"] == "failed" and len(recs) == 5
        # OPENSEARCH_CA_BUNDLE trusts it
        s = settings(tmp_path / "b", (fake.url,), opensearch_ca_bundle=cert)
        asyncio.run(run(s, Metrics(), lambda c: [post(c, {"i": 10 + i}) for i in range(5)]))
        # OPENSEARCH_VERIFY_TLS=false accepts anything
        s = settings(tmp_path / "c", (fake.url,), opensearch_verify_tls=False)
        asyncio.run(run(s, Metrics(), lambda c: [post(c, {"i": 20 + i}) for i in range(5)]))
        got = sorted(d["event"]["i"] for d in fake.all_docs().values())
    assert got == [*range(10, 15), *range(20, 25)]


# ------------------------------------------------------------------------------------ nodes


def test_round_robin_over_nodes_and_a_dead_node_is_skipped(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with FakeOpenSearch() as a, FakeOpenSearch() as b:
        s = settings(tmp_path, (dead, a.url, b.url), bulk_batch_size=10)
        m = Metrics()
        asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(60)]))
        # the dead node fails once (the start-up probe or the first batch), then it is skipped
        assert sample(m, "upload_attempts_total", sink="opensearch", outcome="retry", reason="connection") <= 1
        assert len(a.bulk_requests()) == 3 and len(b.bulk_requests()) == 3
        got = {**a.all_docs(), **b.all_docs()}
        assert sorted(d["event"]["i"] for d in got.values()) == list(range(60))
        assert not set(a.all_docs()) & set(b.all_docs())


def test_node_pool_cooldown_and_return() -> None:
    now = [100.0]
    nodes = Nodes(["http://a", "http://b/", "http://c"], clock=lambda: now[0])
    assert [nodes.pick() for _ in range(4)] == ["http://a", "http://b", "http://c", "http://a"]
    nodes.failed("http://b")
    assert [nodes.pick() for _ in range(4)] == ["http://c", "http://a", "http://c", "http://a"]
    now[0] += 2.01  # the first cooldown is 2 s
    assert "http://b" in {nodes.pick() for _ in range(3)}
    nodes.failed("http://b")  # a second failure in a row doubles the cooldown
    now[0] += 2.01
    assert "http://b" not in {nodes.pick() for _ in range(6)}
    nodes.ok("http://b")
    assert "http://b" in {nodes.pick() for _ in range(3)}
    for u in nodes.urls:  # every node down: still try the one that comes back first
        nodes.failed(u)
    now[0] += 0.5
    assert nodes.pick() in nodes.urls


# ------------------------------------------------------------------------------------ SigV4


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def verify_sigv4(req: Any, secret: str, region: str, service: str) -> None:
    """Recompute the signature from what the server received (independently of botocore)."""
    h = {k.lower(): v for k, v in req.headers.items()}
    auth = h["authorization"]
    algo, _, rest = auth.partition(" ")
    assert algo == "AWS4-HMAC-SHA256"
    parts = dict(p.strip().split("=", 1) for p in rest.split(","))
    ak, date, reg, svc, term = parts["Credential"].split("/")
    assert (reg, svc, term) == (region, service, "aws4_request")
    amz_date = h["x-amz-date"]
    assert amz_date[:8] == date
    signed = parts["SignedHeaders"].split(";")
    assert "host" in signed and "x-amz-date" in signed and "x-amz-content-sha256" in signed
    body_sha = hashlib.sha256(req.raw).hexdigest()
    assert h["x-amz-content-sha256"] == body_sha  # aoss needs it; it must be the hash of the bytes sent
    canonical_headers = "".join(f"{n}:{' '.join(h[n].strip().split())}\n" for n in signed)
    query = "&".join(sorted(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                            for k, _, v in (q.partition("=") for q in req.query.split("&") if q)))
    creq = "\n".join([req.method, quote(urlsplit(req.path).path, safe="/~"), query, canonical_headers,
                      parts["SignedHeaders"], body_sha])
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, f"{date}/{region}/{service}/aws4_request",
                     hashlib.sha256(creq.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), date), region), service), "aws4_request")
    assert hmac.new(key, sts.encode(), hashlib.sha256).hexdigest() == parts["Signature"]
    stamp = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 300  # signed with the real clock


@pytest.mark.parametrize(("service", "gz"), [("es", False), ("aoss", True)])
def test_sigv4_signature_verifies_for_es_and_aoss(tmp_path: Path, fake: FakeOpenSearch, service: str,
                                                   gz: bool) -> None:
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token-1")
    s = settings(tmp_path, (fake.url,), opensearch_aws_sigv4=True, opensearch_aws_service=service,
                 aws_region="eu-west-1", opensearch_gzip=gz)
    asyncio.run(run(s, Metrics(), lambda c: [post(c, {"i": i}) for i in range(25)], credentials=creds))
    [req] = fake.bulk_requests()
    assert req.headers["X-Amz-Security-Token"] == "session-token-1"
    assert req.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    verify_sigv4(req, creds.secret_key, "eu-west-1", service)
    # and a wrong secret does not verify: the check is real
    with pytest.raises(AssertionError):
        verify_sigv4(req, "not-the-secret", "eu-west-1", service)
    assert len(fake.all_docs()) == 25
    # the start-up probe (GET /, no body even with OPENSEARCH_GZIP) is signed too
    async def probe() -> None:
        sink = OpenSearchSink(s, credentials=creds)
        await sink.start()
        try:
            await sink.check()
        finally:
            await sink.aclose()

    fake.requests.clear()
    asyncio.run(probe())
    [get] = fake.requests
    assert get.method == "GET" and get.raw == b"" and "Content-Encoding" not in get.headers
    verify_sigv4(get, creds.secret_key, "eu-west-1", service)


def test_sigv4_default_credential_chain(tmp_path: Path, fake: FakeOpenSearch) -> None:
    """No credentials passed: botocore's default chain (here the environment tests/conftest.py sets)."""
    s = settings(tmp_path, (fake.url,), opensearch_aws_sigv4=True, aws_region="us-east-1")
    asyncio.run(run(s, Metrics(), lambda c: [post(c, {"i": i}) for i in range(3)]))
    [req] = fake.bulk_requests()
    assert "Credential=testing/" in req.headers["Authorization"]
    verify_sigv4(req, "testing", "us-east-1", "es")


def test_rejected_names_stay_v1_style_and_distinct() -> None:
    from estat_ingest.formats.keys import NAME_RE

    n = "1764805500_t-abc123_000042.jsonl.gz"
    r1, r2 = rejected_name(n, 1), rejected_name(n, 2)
    assert len({n, r1, r2}) == 3
    for r in (r1, r2):
        m = NAME_RE.match(r)
        assert m and m.group("unix") == "1764805500" and m.group("counter") == "000042"
        assert r.endswith(".jsonl.gz")


@pytest.mark.parametrize(("value", "ok"), [
    ("events-%Y.%m.%d", True), ("logs-estat", True), ("e-%Y-%m-%d-%H", True),
    ("Events-%Y", False), ("ev-%b", False), ("logs estat", False), ("a/b", False), ("_x", False), ("a,b", False),
])
def test_opensearch_index_template_is_checked_on_the_name_it_renders(value: str, ok: bool) -> None:
    from estat_ingest.config import ConfigError

    if ok:
        assert Settings.from_env({"OPENSEARCH_INDEX": value}).opensearch_index == value
    else:
        with pytest.raises(ConfigError, match="OPENSEARCH_INDEX"):
            Settings.from_env({"OPENSEARCH_INDEX": value})


# ------------------------------------------------------------------------------------ big payloads


def replay_payload(n: int, name: str = "1764805500_t-abc123_000001.jsonl.gz") -> Payload:
    from estat_ingest.formats.codec import compress
    from estat_ingest.pipeline.record import IdGen, encode_record

    ids = IdGen()
    lines = [encode_record(TS, "198.51.100.7", "ua", "", orjson.dumps({"i": i}).decode(), ids.next(TS))
             for i in range(n)]
    return Payload(name=name, partition="dt=2025-12-04/hr=08", num_events=n, data=compress(b"".join(lines), "gzip", 1),
                   compression="gzip", first_ts=TS, attempts=3)


async def send_once(s: Settings, payload: Payload) -> Any:
    sink = OpenSearchSink(s, metrics=Metrics())
    await sink.start()
    try:
        return await sink.send(payload)
    finally:
        await sink.aclose()


@pytest.mark.parametrize(("second", "outcome", "reason"), [
    (503, Outcome.RETRY, "server_error"), (401, Outcome.REJECT, "auth")])
def test_a_payload_over_the_bulk_limits_is_cut_and_progress_is_kept(
        tmp_path: Path, fake: FakeOpenSearch, second: int, outcome: Outcome, reason: str) -> None:
    """A DLQ file written under larger limits (or an S3 file replayed here) goes out in requests of
    BULK_BATCH_SIZE; when one fails, what was delivered is reported and only the rest remains."""
    s = settings(tmp_path, (fake.url,), bulk_batch_size=100)
    payload = replay_payload(230)
    fake.status_script = [200, second]
    result = asyncio.run(send_once(s, payload))
    assert result.outcome is outcome and result.reason == reason and result.delivered == 100
    rem = result.remainder
    assert rem is not None and rem.name == payload.name and rem.num_events == 130 and rem.lines is not None
    assert [orjson.loads(orjson.loads(x)["body"])["i"] for x in rem.lines] == list(range(100, 230))
    assert decompress(rem.data, "gzip") == b"".join(rem.lines)  # what the DLQ would keep
    result = asyncio.run(send_once(s, rem))
    assert result.outcome is Outcome.OK and result.delivered == 130
    assert [len(r.ids) for r in fake.bulk_requests()] == [100, 100, 100, 30]
    assert sorted(d["event"]["i"] for d in fake.all_docs().values()) == list(range(230))
    assert all(n == 1 for n in fake.indexed.values())


def test_a_long_attempt_stops_sending_at_half_its_budget_and_keeps_the_rest(
        tmp_path: Path, fake: FakeOpenSearch) -> None:
    s = settings(tmp_path, (fake.url,), bulk_batch_size=100, opensearch_timeout_s=2.0)
    fake.delay_script = [1.2]  # the first request alone takes more than half of OPENSEARCH_TIMEOUT
    result = asyncio.run(send_once(s, replay_payload(250)))
    assert result.outcome is Outcome.RETRY and result.reason == "time_budget" and result.delivered == 100
    assert result.remainder is not None and result.remainder.num_events == 150
    assert [len(r.ids) for r in fake.bulk_requests()] == [100]


def test_sigv4_without_any_credentials_starts_and_sends_batches_to_the_dlq(
        tmp_path: Path, fake: FakeOpenSearch, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no IMDS lookups off 127.0.0.1
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s = settings(tmp_path, (fake.url,), opensearch_aws_sigv4=True, aws_region="us-east-1")
    m = Metrics()
    dlq = tmp_path / "dlq" / "opensearch"
    with caplog.at_level(logging.INFO, logger="estat_ingest.sinks.opensearch"):
        asyncio.run(run(s, m, lambda c: [post(c, {"i": i}) for i in range(4)],
                        until=lambda: bool(top_files(dlq) or top_files(dlq / "rejected"))))
    assert fake.requests == []  # nothing unsigned ever left
    [(_, meta, recs)] = dlq_entries(tmp_path / "dlq")
    assert meta["reason"] == "outage" and len(recs) == 4
    assert sample(m, "upload_attempts_total", sink="opensearch", outcome="reject", reason="auth") >= 1
    assert any(r.getMessage() == "opensearch: no AWS credentials for SigV4" for r in caplog.records)


def test_failure_logs_are_rate_limited_with_a_suppressed_count() -> None:
    from estat_ingest.log import RateLimitedLog  # what the sink's failure logs go through

    now = [0.0]
    lim = RateLimitedLog(10.0, clock=lambda: now[0])
    assert lim.allow("partial") == 0
    assert [lim.allow("partial") for _ in range(5)] == [None] * 5
    assert lim.allow("status:503") == 0  # another kind is not held back
    now[0] = 10.5
    assert lim.allow("partial") == 5
    assert lim.allow("partial") is None
