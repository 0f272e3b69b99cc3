"""SIGTERM drains without losing a 2xx event — with the sink up, with it unreachable, with
requests still arriving, and with a second signal (DESIGN.md §2 invariants 1 and 6, §7, §9 d)."""

from __future__ import annotations

import gzip
import signal
import socket
import time
from pathlib import Path
from typing import Any

import orjson

from tests.helpers import ServerProcess, file_objects, free_port, records_of, s3_objects

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)


def dlq_bodies(root: Path) -> list[str]:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and not p.name.endswith(".meta.json") and not p.name.startswith("."):
            out += [orjson.loads(line)["body"] for line in gzip.decompress(p.read_bytes()).splitlines()]
    return out


def test_sigterm_delivers_everything_to_s3(tmp_path: Path, moto: Any, bucket: str, s3: Any) -> None:
    srv = ServerProcess({"RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint, "AWS_REGION": "us-east-1",
                         "DLQ_DIR": str(tmp_path / "dlq"), "BATCH_SIZE": "300"}, tmp_path).start()
    sent = []
    try:
        for i in range(1000):
            body = orjson.dumps({"i": i}).decode()
            if srv.post(body.encode())[0] == 200:
                sent.append(body)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    got = sorted(r["body"] for _, r in records_of(s3_objects(s3, bucket)))
    assert got == sorted(sent) and len(sent) == 1000
    assert dlq_bodies(tmp_path / "dlq") == []
    done = [r for r in srv.log_records() if r.get("message") == "shutdown complete"]
    assert done and done[0]["lifetime_delivered_events"] == 1000 and done[0]["spilled_events"] == 0
    assert 0 < done[0]["delivered_events"] <= 1000  # this drain's share: the last, partial batches


def test_sigterm_with_s3_unreachable_spills_everything_and_exits_in_time(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here
    srv = ServerProcess({"RAW_BUCKET": "b", "S3_ENDPOINT_URL": f"http://127.0.0.1:{dead}",
                         "AWS_REGION": "us-east-1", "DLQ_DIR": str(tmp_path / "dlq"), "BATCH_SIZE": "100",
                         "S3_TIMEOUT": "1s", "S3_APP_RETRIES": "50", "SHUTDOWN_TIMEOUT": "4s"}, tmp_path).start()
    sent = []
    try:
        for i in range(450):
            body = orjson.dumps({"i": i}).decode()
            if srv.post(body.encode())[0] == 200:
                sent.append(body)
    finally:
        srv.signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = srv.wait(timeout=4 + 10)  # SHUTDOWN_TIMEOUT plus a margin, or the test fails here
        elapsed = time.monotonic() - t0
    assert code == 0, srv.log()
    assert sorted(dlq_bodies(tmp_path / "dlq" / "s3")) == sorted(sent) and len(sent) == 450
    done = [r for r in srv.log_records() if r.get("message") == "shutdown complete"]
    assert done[0]["spilled_events"] == 450 and done[0]["lost_events"] == 0 and done[0]["aborted"] is True
    print(f"drain with S3 down took {elapsed:.2f}s of a 4s budget")


def _slow_request(port: int, body: bytes) -> socket.socket:
    """Send headers and half the body, then stall (a slow client caught by SIGTERM)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = (f"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    s.sendall(head + body[: len(body) // 2])
    return s


def test_in_flight_requests_at_sigterm_are_answered_and_kept(tmp_path: Path) -> None:
    """§9 d: v1 closed the queue under handlers still reading bodies; they lost their events."""
    data = tmp_path / "data"
    srv = ServerProcess({"FILE_SINK_DIR": str(data), "DLQ_DIR": str(tmp_path / "dlq"),
                         "SHUTDOWN_TIMEOUT": "20s"}, tmp_path).start()
    bodies = [orjson.dumps({"slow": i, "pad": "x" * 200}) for i in range(5)]
    socks = [_slow_request(srv.port, b) for b in bodies]
    time.sleep(0.3)
    assert srv.post(b'{"fast":1}')[0] == 200
    srv.signal(signal.SIGTERM)
    time.sleep(0.5)  # the server is now draining while the slow clients are mid-body
    answers = []
    for s, b in zip(socks, bodies, strict=True):
        s.sendall(b[len(b) // 2:])
        answers.append(s.recv(4096).split(b"\r\n", 1)[0])
        s.close()
    code = srv.wait(30)
    assert code == 0, srv.log()
    assert answers == [b"HTTP/1.1 200 OK"] * 5
    got = sorted(r["body"] for _, r in records_of(file_objects(data)))
    assert got == sorted([b.decode() for b in bodies] + ['{"fast":1}'])


def test_second_signal_skips_to_the_spill(tmp_path: Path) -> None:
    dead = free_port()
    srv = ServerProcess({"RAW_BUCKET": "b", "S3_ENDPOINT_URL": f"http://127.0.0.1:{dead}",
                         "AWS_REGION": "us-east-1", "DLQ_DIR": str(tmp_path / "dlq"), "S3_TIMEOUT": "2s",
                         "S3_APP_RETRIES": "100", "SHUTDOWN_TIMEOUT": "600s"}, tmp_path).start()
    for i in range(20):
        assert srv.post(orjson.dumps({"i": i}))[0] == 200
    srv.signal(signal.SIGTERM)
    time.sleep(1.0)
    srv.signal(signal.SIGTERM)
    code = srv.wait(30)  # without the second signal this would wait for the 600 s budget
    assert code == 0, srv.log()
    assert sorted(dlq_bodies(tmp_path / "dlq")) == sorted(orjson.dumps({"i": i}).decode() for i in range(20))
    assert any(r.get("message") == "second signal: spilling to the dlq now" for r in srv.log_records())
