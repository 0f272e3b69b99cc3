"""Fan-out end to end: `estat-ingest serve` with SINKS=s3,opensearch against moto and the local _bulk fake.

A sink that is down must not stall the other: S3 keeps receiving every event while OpenSearch's
batches go to its own DLQ directory, and replay when it comes back. SIGTERM loses nothing on either
side: every 2xx event is delivered or in that sink's DLQ files.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fake_opensearch import FakeOpenSearch, wait_until
from tests.helpers import ServerProcess, decode_object, free_port, http, records_of, s3_objects

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)


def dlq_records(d: Path) -> list[dict[str, Any]]:
    """Every record in a sink's DLQ directory, its rejected/ and corrupt/ subdirectories included."""
    out: list[dict[str, Any]] = []
    if not d.exists():
        return out
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.name.endswith(".meta.json") and not p.name.startswith(".") \
                and ".claim-" not in p.name:
            out += decode_object(p.name, p.read_bytes())
    return out


def top_data_files(d: Path) -> list[Path]:
    return [p for p in d.glob("*") if p.is_file() and not p.name.endswith(".meta.json")
            and not p.name.startswith(".")] if d.exists() else []


def send_events(srv: ServerProcess, tag: str, nd_requests: int = 20, per_request: int = 50, singles: int = 50
                ) -> list[str]:
    """NDJSON requests and single POSTs; returns the bodies answered 200 (all of them, asserted)."""
    sent: list[str] = []
    for r in range(nd_requests):
        lines = [orjson.dumps({"tag": tag, "r": r, "k": k}) for k in range(per_request)]
        status = srv.post(b"\n".join(lines) + b"\n", {"Content-Type": "application/x-ndjson"})[0]
        assert status == 200
        sent += [ln.decode() for ln in lines]
    for i in range(singles):
        body = orjson.dumps({"tag": tag, "single": i})
        assert srv.post(body)[0] == 200
        sent.append(body.decode())
    return sent


def stop(srv: ServerProcess, timeout: float = 30.0) -> int:
    """SIGTERM and wait; a server that does not exit in time is killed (never left running)."""
    if srv.proc is None:
        return -1
    try:
        return srv.stop(timeout)
    except subprocess.TimeoutExpired:
        srv.kill()
        raise


def env_for(tmp_path: Path, moto: Any, bucket: str, os_url: str, **extra: str) -> dict[str, str]:
    return {
        "SINKS": "s3,opensearch", "RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint,
        "AWS_REGION": "us-east-1", "DLQ_DIR": str(tmp_path / "dlq"), "OPENSEARCH_URL": os_url,
        "BATCH_SIZE": "200", "FLUSH_INTERVAL": "500ms", "BULK_BATCH_SIZE": "50", "BULK_FLUSH_INTERVAL_MS": "200",
        "UPLOAD_QUEUE": "2", "OPENSEARCH_RETRIES": "1", "OPENSEARCH_TIMEOUT": "2s", **extra,
    }


def s3_bodies(s3: Any, bucket: str, prefix: str = "raw/") -> list[str]:
    return [r["body"] for _, r in records_of(s3_objects(s3, bucket, prefix))]


@pytest.mark.parametrize("down", ["503", "not_listening"])
def test_opensearch_down_s3_gets_everything_then_the_dlq_replays(
        tmp_path: Path, moto: Any, bucket: str, s3: Any, down: str) -> None:
    fake = FakeOpenSearch()
    if down == "503":
        fake.down = True  # every request answers 503
        fake.start()
    srv = ServerProcess(env_for(tmp_path, moto, bucket, fake.url), tmp_path)
    try:
        srv.start()
        t0 = time.monotonic()
        sent = send_events(srv, "down")
        post_s = time.monotonic() - t0
        # S3 receives every event while OpenSearch is down: its lane never waits for the other one
        wait_until(lambda: len(s3_bodies(s3, bucket)) == len(sent), 30, "every event in S3")
        assert sorted(s3_bodies(s3, bucket)) == sorted(sent)
        wait_until(lambda: len(dlq_records(tmp_path / "dlq" / "opensearch")) == len(sent), 30,
                   "every event in the opensearch DLQ")
        assert fake.all_docs() == {}
        assert bool(fake.bulk_requests()) == (down == "503")  # it was tried, and refused
        assert dlq_records(tmp_path / "dlq" / "s3") == []
        metrics = http("GET", srv.url + "/metrics")[2].decode()
        print(f"posted {len(sent)} events in {post_s:.2f}s with OpenSearch down")
        print("\n".join(ln for ln in metrics.splitlines() if ln.startswith("dlq_batches_written_total")))

        # OpenSearch is back: the replayer empties the opensearch DLQ
        if down == "503":
            fake.down = False
        else:
            fake.start()
        wait_until(lambda: len(fake.all_docs()) == len(sent), 60, "every event indexed from the DLQ")
        wait_until(lambda: not top_data_files(tmp_path / "dlq" / "opensearch"), 30, "an empty opensearch DLQ")
    finally:
        code = stop(srv)
        fake.stop()
    assert code == 0, srv.log()
    docs = fake.all_docs()
    assert sorted(orjson.dumps(d["event"]).decode() for d in docs.values()) == sorted(sent)
    assert all(n == 1 for n in fake.indexed.values())  # each event indexed exactly once
    assert sorted(s3_bodies(s3, bucket)) == sorted(sent)  # and S3 has each exactly once
    assert dlq_records(tmp_path / "dlq" / "opensearch") == []


@pytest.mark.parametrize("opensearch", ["slow", "unreachable"])
def test_sigterm_with_both_sinks_loses_nothing_on_either(
        tmp_path: Path, moto: Any, bucket: str, s3: Any, opensearch: str) -> None:
    fake: FakeOpenSearch | None = None
    if opensearch == "slow":
        fake = FakeOpenSearch()
        fake.delay_s = 1.0  # 6+ bulk requests in series: the drain budget runs out mid-request
        fake.start()
        url = fake.url
    else:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    env = env_for(tmp_path, moto, bucket, url, SHUTDOWN_TIMEOUT="3s", BULK_BATCH_SIZE="100",
                  OPENSEARCH_RETRIES="3", BATCH_SIZE="300")
    srv = ServerProcess(env, tmp_path)
    try:
        srv.start()
        sent = send_events(srv, opensearch, nd_requests=10, per_request=50, singles=100)
    finally:
        code = stop(srv)
        if fake is not None:
            fake.stop()
    assert code == 0, srv.log()
    want = Counter(sent)
    # S3: delivered or in its DLQ, each exactly once
    got_s3 = Counter(s3_bodies(s3, bucket)) + Counter(r["body"] for r in dlq_records(tmp_path / "dlq" / "s3"))
    assert got_s3 == want
    # OpenSearch: indexed or in its DLQ (a request cut by the deadline may be both: replay answers 409)
    indexed = [orjson.dumps(d["event"]).decode() for d in fake.all_docs().values()] if fake else []
    spilled = [r["body"] for r in dlq_records(tmp_path / "dlq" / "opensearch")]
    assert set(indexed) | set(spilled) == set(want) and len(set(spilled)) == len(spilled)
    if fake is not None:
        assert all(n == 1 for n in fake.indexed.values())
    else:
        assert Counter(spilled) == want
    done = [r for r in srv.log_records() if r.get("message") == "shutdown complete"]
    assert done and done[0]["lost_events"] == 0
    if fake is None:  # the start-up check said so, and /ready was 200 all along (start() waited for it)
        assert any(r.get("message", "").startswith("opensearch unreachable at start-up") and r.get("node") == url
                   for r in srv.log_records())
    print(f"{opensearch}: indexed {len(set(indexed))}, in the opensearch dlq {len(spilled)}, "
          f"drain report {done[0]}")


def test_dlq_replay_command_delivers_opensearch_files(tmp_path: Path) -> None:
    """`estat-ingest dlq replay DIR` with the sink settings of `serve` (OpenSearch came back later)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"SINKS": "opensearch", "OPENSEARCH_URL": url, "DLQ_DIR": str(tmp_path / "dlq"),
           "BULK_BATCH_SIZE": "40", "OPENSEARCH_RETRIES": "0", "SHUTDOWN_TIMEOUT": "3s"}
    srv = ServerProcess(env, tmp_path)
    try:
        srv.start()
        sent = send_events(srv, "cli", nd_requests=4, per_request=50, singles=10)
    finally:
        code = stop(srv)
    assert code == 0, srv.log()
    assert sorted(r["body"] for r in dlq_records(tmp_path / "dlq" / "opensearch")) == sorted(sent)
    with FakeOpenSearch(port) as fake:
        proc = subprocess.run([sys.executable, "-m", "estat_ingest", "dlq", "replay", "--no-progress",
                               str(tmp_path / "dlq")], env={**srv.env}, capture_output=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
        docs = fake.all_docs()
    assert sorted(orjson.dumps(d["event"]).decode() for d in docs.values()) == sorted(sent)
    assert all(n == 1 for n in fake.indexed.values())
    assert dlq_records(tmp_path / "dlq" / "opensearch") == []
