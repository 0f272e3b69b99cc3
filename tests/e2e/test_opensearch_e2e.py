"""`estat-ingest serve` with SINKS=opensearch against a misbehaving cluster: loss and duplicates.

Like AWS's load tests for Fluent Bit, the check is not "no exception" but: every accepted event is
indexed exactly once, and the ones the cluster refuses for good are in the DLQ with their reason.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from tests.fake_opensearch import FakeOpenSearch, wait_until
from tests.helpers import ServerProcess, decode_object, http

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (.+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


def files_in(d: Path) -> list[Path]:
    return [p for p in d.glob("*") if p.is_file() and not p.name.endswith(".meta.json")
            and not p.name.startswith(".")] if d.exists() else []


def test_chaos_every_good_event_indexed_once_rejects_in_the_dlq_with_reasons(tmp_path: Path) -> None:
    fake = FakeOpenSearch()
    fake.throttle_every = 3  # a third of the items get an item-level 429 the first time they are seen
    fake.status_script = [200, 503, 200, 429]  # two whole requests refused
    fake.drop_script = [False, False, True, False, True]  # two requests indexed, then the connection cut
    fake.basic_auth = ("ingest", "pw")
    fake.start()
    dlq = tmp_path / "dlq" / "opensearch"
    srv = ServerProcess({
        "SINKS": "opensearch", "OPENSEARCH_URL": fake.url, "OPENSEARCH_USERNAME": "ingest",
        "OPENSEARCH_PASSWORD": "pw", "OPENSEARCH_GZIP": "true", "OPENSEARCH_RETRIES": "6",
        "BULK_BATCH_SIZE": "200", "BULK_FLUSH_INTERVAL_MS": "100", "BULK_MAX_PARALLEL_FLUSHES": "2",
        "DLQ_DIR": str(tmp_path / "dlq"), "CHANNEL_SIZE": "20000",
    }, tmp_path)
    good: set[int] = set()
    bad: set[int] = set()
    try:
        srv.start()
        for r in range(100):
            lines = []
            for k in range(50):
                n = r * 50 + k
                reject = n % 100 == 7
                (bad if reject else good).add(n)
                lines.append(orjson.dumps({"n": n, "reject": True} if reject else {"n": n}))
            assert srv.post(b"\n".join(lines) + b"\n", {"Content-Type": "application/x-ndjson"})[0] == 200
        wait_until(lambda: len(fake.all_docs()) == len(good), 60, "every good event indexed")
        # rejects: written aside on the fresh path, refused once more on replay, then parked in rejected/
        wait_until(lambda: not files_in(dlq) and sum(len(decode_object(p.name, p.read_bytes()))
                                                       for p in files_in(dlq / "rejected")) == len(bad),
                   60, "every reject in rejected/")
        text = http("GET", srv.url + "/metrics")[2].decode()
    finally:
        try:
            code = srv.stop() if srv.proc is not None else -1
        finally:
            srv.kill()  # only if it is still running (a stop that timed out)
            fake.stop()
    assert code == 0, srv.log()
    docs = fake.all_docs()
    assert sorted(d["event"]["n"] for d in docs.values()) == sorted(good)
    assert all(n == 1 for n in fake.indexed.values())  # never twice, despite drops and retries
    assert fake.item_statuses[409] >= 1  # the cut connections were retried and answered "already there"
    assert all(r.headers.get("Content-Encoding") == "gzip" for r in fake.bulk_requests())
    rejected: dict[int, dict[str, Any]] = {}
    for p in files_in(dlq / "rejected"):
        meta = orjson.loads((p.parent / (p.name + ".meta.json")).read_bytes())
        errors = {e["_id"]: e for e in meta["item_errors"]}
        for rec in decode_object(p.name, p.read_bytes()):
            rejected[orjson.loads(rec["body"])["n"]] = errors[rec["id"]]
    assert set(rejected) == bad
    assert {(e["status"], e["type"]) for e in rejected.values()} == {(400, "mapper_parsing_exception")}
    assert metric(text, "events_delivered_total", sink="opensearch") == len(good)
    assert metric(text, "opensearch_items_total", outcome="rejected") == 2 * len(bad)  # fresh + one replay
    created = metric(text, "opensearch_items_total", outcome="created")
    duplicate = metric(text, "opensearch_items_total", outcome="duplicate")
    assert created + duplicate == len(good)  # each good event counted delivered once, as one or the other
    print(f"requests {len(fake.bulk_requests())}, item statuses {dict(fake.item_statuses)}, "
          f"created {created}, duplicate {duplicate}, retried "
          f"{metric(text, 'opensearch_items_total', outcome='retried')}")
