"""Hostile input against a real `estat-ingest serve` subprocess (DESIGN.md §2 invariant 5).

After every attack the same server must still answer /health, still accept a normal event that
then reaches the file sink, and its RSS must stay under RSS_BOUND_BYTES (stated bound: 128 MiB for
a server whose idle RSS here is ~42 MiB; MAX_BODY_SIZE=16 KiB, so no request may cost more than
a few times that). Counters are read from /metrics.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import random
import socket
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import HELD_REST, ServerProcess, file_objects, hold_posts, http, records_of

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)
RSS_BOUND_BYTES = 128 * 1024 * 1024
MAX = 16384
READ_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 3.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def metric(srv: ServerProcess, name: str, **labels: str) -> float:
    text = http("GET", srv.url + "/metrics")[2].decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def raw(port: int, data: bytes, timeout: float = 10.0, half_close: bool = True) -> bytes:
    """Send bytes, read until the server closes (or `timeout`); the raw answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close on us mid-send: that is an answer too
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def delivered_bodies(root: Path) -> list[str]:
    return [r["body"] for _, r in records_of(file_objects(root))] if root.exists() else []


class Hostile:
    def __init__(self, srv: ServerProcess, data: Path) -> None:
        self.srv = srv
        self.data = data
        assert srv.proc is not None
        self.pid = srv.proc.pid
        self.baseline_rss = rss_bytes(self.pid)
        self.peak_rss = self.baseline_rss

    def still_healthy(self) -> None:
        """/health answers, a normal event is accepted and lands in the sink, RSS within bound."""
        assert self.srv.proc is not None and self.srv.proc.poll() is None, self.srv.log()[-3000:]
        status, _, body = http("GET", self.srv.url + "/health")
        assert (status, body) == (200, b"ok")
        marker = uuid.uuid4().hex
        body = orjson.dumps({"probe": marker}).decode()
        assert self.srv.post(body.encode(), {"Content-Type": "application/json"})[0] == 200
        deadline = time.monotonic() + 20
        while body not in delivered_bodies(self.data):
            assert time.monotonic() < deadline, "normal event not delivered"
            time.sleep(0.1)
        rss = rss_bytes(self.pid)
        self.peak_rss = max(self.peak_rss, rss)
        assert rss < RSS_BOUND_BYTES, f"RSS {rss} over bound"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    srv = ServerProcess({
        "FILE_SINK_DIR": str(tmp / "data"), "DLQ_DIR": str(tmp / "dlq"), "FLUSH_INTERVAL": "200ms",
        "MAX_BODY_SIZE": str(MAX), "REQUEST_READ_TIMEOUT": f"{READ_TIMEOUT_S}s", "LOG_LEVEL": "info",
        "HEADER_READ_TIMEOUT": f"{HEADER_TIMEOUT_S}s",
    }, tmp)
    try:
        srv.start()
    except BaseException:
        srv.kill()  # a server that never became ready must not outlive the test
        raise
    h = Hostile(srv, tmp / "data")
    try:
        yield h
    finally:
        code = srv.stop() if srv.proc is not None and srv.proc.poll() is None else -1
        srv.kill()
        print(f"\nhostile server RSS: baseline {h.baseline_rss / 2**20:.1f} MiB, "
              f"peak seen {h.peak_rss / 2**20:.1f} MiB, bound {RSS_BOUND_BYTES / 2**20:.0f} MiB")
        assert code == 0


def post_raw(port: int, body: bytes, extra: bytes = b"") -> bytes:
    head = (b"POST /collect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return raw(port, head + body)


def test_exact_limit_and_over_limit_bodies(hostile: Hostile) -> None:
    srv = hostile.srv
    exact = b'"' + b"e" * (MAX - 2) + b'"'
    assert len(exact) == MAX
    assert srv.post(exact)[0] == 200
    assert srv.post(exact + b" ")[0] == 413
    assert http("GET", srv.url + "/collect?" + "g" * MAX)[0] == 200
    assert http("GET", srv.url + "/collect?" + "g" * (MAX + 1))[0] == 413
    # a huge announced body is refused before it is read, not after 10 MB arrive
    answer = raw(srv.port, b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
                 half_close=False)  # not one body byte sent: the 413 cannot have waited for them
    assert status_of(answer) == 413
    assert metric(srv, "http_requests_rejected_body_too_large_total") >= 3
    hostile.still_healthy()
    assert exact.decode() in delivered_bodies(hostile.data)


def test_invalid_json_invalid_utf8_deep_nesting(hostile: Hostile) -> None:
    srv = hostile.srv
    before = {r: metric(srv, "http_requests_rejected_total", reason=r)
              for r in ("invalid_json", "invalid_utf8", "too_deep", "empty")}
    assert srv.post(b'{"a":')[0] == 400
    assert srv.post(b'{"a":"\xff\xfe"}')[0] == 400
    assert srv.post(b"[" * 65 + b"]" * 65)[0] == 400  # MAX_JSON_DEPTH default 64
    assert srv.post(b"[" * 64 + b"]" * 64)[0] == 200
    assert srv.post(b"[" * (MAX // 2) + b"]" * (MAX // 2))[0] == 400
    assert srv.post(b'{"a":' * 3000)[0] == 400
    assert srv.post(b"   ")[0] == 400
    nd = b'{"ok":1}\n{"bad":\n'
    assert srv.post(nd, {"Content-Type": "application/x-ndjson"})[0] == 400
    after = {r: metric(srv, "http_requests_rejected_total", reason=r) for r in before}
    assert after["invalid_json"] - before["invalid_json"] >= 3
    assert after["invalid_utf8"] - before["invalid_utf8"] == 1
    assert after["too_deep"] - before["too_deep"] >= 1
    assert after["empty"] - before["empty"] == 1
    hostile.still_healthy()
    assert '{"ok":1}' not in delivered_bodies(hostile.data)  # NDJSON is all-or-nothing


def test_compression_bombs_broken_streams_unknown_encodings(hostile: Hostile) -> None:
    srv = hostile.srv
    gz_bomb = gzip.compress(b"0" * 10_000_000, 9)
    zs_bomb = zstandard.ZstdCompressor(level=19).compress(b"0" * 10_000_000)
    assert len(gz_bomb) < MAX and len(zs_bomb) < MAX
    rss0 = rss_bytes(hostile.pid)
    for _ in range(20):
        assert srv.post(gz_bomb, {"Content-Encoding": "gzip"})[0] == 413
        assert srv.post(zs_bomb, {"Content-Encoding": "zstd"})[0] == 413
        assert srv.post(zlib.compress(b"1" * 10_000_000, 9), {"Content-Encoding": "deflate"})[0] == 413
    grown = rss_bytes(hostile.pid) - rss0
    print(f"\nRSS growth after 60 10-MB bombs: {grown / 2**20:.1f} MiB")
    assert grown < 32 * 1024 * 1024  # never the 10 MB per bomb
    good = b'{"compressed":true}'
    assert srv.post(gzip.compress(good)[:-5], {"Content-Encoding": "gzip"})[0] == 400
    assert srv.post(b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"})[0] == 400
    assert srv.post(zstandard.ZstdCompressor().compress(good)[:-3], {"Content-Encoding": "zstd"})[0] == 400
    assert srv.post(good, {"Content-Encoding": "br"})[0] == 415
    assert srv.post(good, {"Content-Encoding": "gzip, zstd"})[0] == 415
    assert srv.post(gzip.compress(good), {"Content-Encoding": "gzip"})[0] == 200
    assert metric(srv, "http_requests_rejected_total", reason="bad_encoding") >= 3
    assert metric(srv, "http_requests_rejected_total", reason="unsupported_encoding") >= 2
    hostile.still_healthy()
    assert good.decode() in delivered_bodies(hostile.data)


def test_huge_and_too_many_headers(hostile: Hostile) -> None:
    srv = hostile.srv
    before = metric(srv, "http_requests_rejected_total", reason="header_too_large")
    # The server answers (aiohttp front 400, fast front 431) and closes after the first 8 KiB; the
    # client may still be sending the rest, in which case its kernel sees a reset and drops the
    # answer (status 0 here). The counter is the proof either way.
    refused = (431 if srv.front == "fast" else 400, 0)
    big = raw(srv.port, b"POST /collect HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n{}")
    assert status_of(big) in refused
    cookie = raw(srv.port, b"GET /collect?a=1 HTTP/1.1\r\nHost: x\r\nCookie: " + b"c=1; " * 20_000 + b"\r\n\r\n")
    assert status_of(cookie) in refused
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(500))
    assert status_of(raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")) in refused
    small = raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert status_of(small) in refused
    assert metric(srv, "http_requests_rejected_total", reason="header_too_large") - before == 4
    hostile.still_healthy()


def test_request_smuggling_attempts_are_rejected(hostile: Hostile) -> None:
    srv = hostile.srv
    marker = uuid.uuid4().hex
    smuggled = orjson.dumps({"smuggled": marker})
    inner = (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(smuggled)).encode()
             + b"\r\n\r\n" + smuggled)
    attempts = [
        # CL.TE: a front end using Content-Length would forward `inner` as part of this body
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + inner,
        # TE.CL
        b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        + hex(len(inner))[2:].encode() + b"\r\n" + inner + b"\r\n0\r\n\r\n",
        # duplicate, conflicting and equal Content-Length
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: " + str(2 + len(inner)).encode()
        + b"\r\n\r\n{}" + inner,
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}" + inner,
        # obfuscated Transfer-Encoding
        b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n" + inner,
        b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + inner,
        b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + inner,
        b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"
        + inner,
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}" + inner,
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\n\r\n{}" + inner.replace(b"\r\n", b"\n"),
    ]
    before = metric(srv, "http_requests_rejected_total", reason="bad_http")
    for attempt in attempts:
        answer = raw(srv.port, attempt)
        statuses = [int(line.split(b" ", 2)[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.")]
        # 400 then close; or only the close, when the reset for our unread bytes overtook the 400
        assert statuses in ([400], []), (attempt[:120], answer[:300])
    assert metric(srv, "http_requests_rejected_total", reason="bad_http") - before == len(attempts)
    hostile.still_healthy()
    assert not [b for b in delivered_bodies(hostile.data) if marker in b]


def test_random_bytes_over_raw_sockets(hostile: Hostile) -> None:
    srv = hostile.srv
    rng = random.Random(5)
    heads = [b"", b"GET ", b"POST /collect HTTP/1.1\r\n",
             b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n", b"GET /collect?",
             b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
    cases = [rng.choice(heads) + rng.randbytes(rng.randint(0, 400)) for _ in range(2000)]
    # well-formed requests whose header VALUES are random bytes (controls removed, so the parser
    # lets most through, \x80-\xff included, and /collect sees them)
    controls = bytes(range(32)).replace(b"\t", b"") + b"\x7f"
    for _ in range(300):
        junk = rng.randbytes(rng.randint(1, 200)).translate(None, controls)
        name = rng.choice([b"User-Agent", b"Cookie", b"X-Forwarded-For", b"Origin", b"Content-Type",
                           b"CloudFront-Viewer-Address", b"Accept", b"X-Api-Key"])
        cases.append(b"POST /collect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n"
                     + name + b": " + junk + b"\r\n\r\n{}")

    def one(data: bytes) -> int:
        return status_of(raw(srv.port, data, timeout=5, half_close=False))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, cases))
    counts: dict[int, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    print(f"\nrandom byte strings: {len(cases)} sent, answers by status (0 = closed without one): {counts}")
    assert not [s for s in statuses if s >= 500]
    assert counts.get(200, 0) >= 100  # most random header values are legal, and their events stored
    assert counts.get(400, 0) > 1000
    assert metric(srv, "http_requests_rejected_total", reason="server_error") == 0
    assert metric(srv, "http_requests_rejected_total", reason="bad_http") > 1000
    hostile.still_healthy()
    log = srv.log()
    assert log.count("malformed request rejected") < 50, "protocol errors must be rate-limited in the log"
    assert "Traceback" not in log


def test_non_utf8_header_bytes_are_stored_as_replacement_characters(hostile: Hostile) -> None:
    srv = hostile.srv
    marker = uuid.uuid4().hex.encode()
    answer = raw(srv.port, b"POST /collect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n"
                 b"User-Agent: bot\xff" + marker + b"\r\nCookie: sid=\xfe\r\n\r\n{}", half_close=False)
    assert status_of(answer) == 200
    hostile.still_healthy()
    [rec] = [r for _, r in records_of(file_objects(hostile.data)) if marker.decode() in r["user_agent"]]
    assert rec["user_agent"] == "bot\ufffd" + marker.decode() and rec["cookie"] == "sid=\ufffd"


def test_200_slow_clients_do_not_stop_a_normal_client(hostile: Hostile) -> None:
    srv = hostile.srv
    before_408 = metric(srv, "http_requests_rejected_total", reason="read_timeout")
    before_hdr = metric(srv, "http_requests_rejected_total", reason="header_timeout")
    slow_headers: list[socket.socket] = []
    slow_bodies: list[socket.socket] = []
    # a keep-alive connection that has served a request is not subject to the header deadline
    keep = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    keep.sendall(health)
    assert keep.recv(4096).startswith(b"HTTP/1.1 200")
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            if i % 2:
                s.sendall(b"POST /collect HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finish
                slow_headers.append(s)
            else:
                s.sendall(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"slow\":")
                slow_bodies.append(s)
        # a normal client is served while all 200 are held (bounded generous wait, not a latency)
        marker = uuid.uuid4().hex
        status, _, _ = http("POST", srv.url + "/collect", orjson.dumps({"normal": marker}), timeout=10)
        assert status == 200
        # slow bodies: 408 after REQUEST_READ_TIMEOUT, then the server closes the connection
        for s in slow_bodies:
            s.settimeout(READ_TIMEOUT_S + 15)
            answer = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            assert status_of(answer) == 408, answer[:200]
        assert metric(srv, "http_requests_rejected_total", reason="read_timeout") - before_408 == 100
        # slow headers: closed by the connection guard once HEADER_READ_TIMEOUT has passed
        for s in slow_headers:
            s.settimeout(HEADER_TIMEOUT_S + 15)
            assert s.recv(4096) == b""
        assert metric(srv, "http_requests_rejected_total", reason="header_timeout") - before_hdr == 100
        keep.sendall(health)  # more than HEADER_READ_TIMEOUT later, same connection
        assert keep.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in [*slow_headers, *slow_bodies, keep]:
            s.close()
    hostile.still_healthy()
    assert orjson.dumps({"normal": marker}).decode() in delivered_bodies(hostile.data)


# ---------------------------------------------------------------- separate servers


def test_in_flight_cap_answers_503_and_recovers(tmp_path: Path, spawn: Any) -> None:
    srv = spawn({"FILE_SINK_DIR": str(tmp_path / "data"), "DLQ_DIR": str(tmp_path / "dlq"),
                 "FLUSH_INTERVAL": "200ms", "MAX_IN_FLIGHT": "4", "REQUEST_READ_TIMEOUT": "30s"}, tmp_path)
    held = hold_posts(srv.port, 4, timeout=10)
    try:
        deadline = time.monotonic() + 10
        while True:  # the 4 bodies are being read by the handler once their headers are parsed
            status, headers, _ = http("POST", srv.url + "/collect", b'{"over":1}')
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503 and headers.get("Retry-After") == "1"
        assert metric(srv, "http_requests_rejected_total", reason="overloaded") >= 1
        for s in held:
            s.sendall(HELD_REST)  # completes the 10-byte bodies
        for s in held:
            assert status_of(s.recv(4096)) == 200
        assert http("POST", srv.url + "/collect", b'{"after":1}')[0] == 200
    finally:
        for s in held:
            s.close()
        assert srv.stop() == 0
    assert sorted(delivered_bodies(tmp_path / "data")).count('{"after":1}') == 1


def test_xff_spoofing_never_records_a_forged_address(tmp_path: Path, spawn: Any) -> None:
    """v1 defect (l): v1 recorded the leftmost public XFF entry; every assertion here fails on v1."""
    forged = "1.2.3.4"
    # loopback trusted (the default): the test client plays the load balancer that appended 203.0.113.9
    a = spawn({"FILE_SINK_DIR": str(tmp_path / "a"), "DLQ_DIR": str(tmp_path / "dlqa"),
               "FLUSH_INTERVAL": "200ms"}, tmp_path)
    # loopback NOT trusted: the peer itself is the client; no header may change that
    b = spawn({"FILE_SINK_DIR": str(tmp_path / "b"), "DLQ_DIR": str(tmp_path / "dlqb"),
               "FLUSH_INTERVAL": "200ms", "TRUSTED_PROXIES": "10.0.0.0/8"}, tmp_path)
    try:
        h1 = {"X-Forwarded-For": f"{forged}, 203.0.113.9"}
        h2 = {"X-Forwarded-For": f"{forged}", "CloudFront-Viewer-Address": f"{forged}:443"}
        for srv in (a, b):
            assert srv.post(b'{"case":1}', h1)[0] == 200
            assert srv.post(b'{"case":2}', h2)[0] == 200
    finally:
        assert a.stop() == 0 and b.stop() == 0
    ips_a = {r["body"]: r["ip"] for _, r in records_of(file_objects(tmp_path / "a"))}
    ips_b = {r["body"]: r["ip"] for _, r in records_of(file_objects(tmp_path / "b"))}
    assert ips_a == {'{"case":1}': "203.0.113.9", '{"case":2}': forged}  # case 2: the LB says so
    assert ips_b == {'{"case":1}': "127.0.0.1", '{"case":2}': "127.0.0.1"}


def test_api_keys_cors_and_pixel_end_to_end(tmp_path: Path, spawn: Any) -> None:
    srv = spawn({"FILE_SINK_DIR": str(tmp_path / "data"), "DLQ_DIR": str(tmp_path / "dlq"),
                 "FLUSH_INTERVAL": "200ms", "API_KEYS": "web:s3cret-web-key,app:s3cret-app-key",
                 "CORS_ALLOW_ORIGINS": "https://shop.example"}, tmp_path)
    try:
        assert srv.post(b'{"k":0}')[0] == 401
        status, headers, _ = srv.post(b'{"k":0}', {"X-Api-Key": "wrong"})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert srv.post(b'{"k":1}', {"Authorization": "Bearer s3cret-web-key"})[0] == 200
        assert srv.post(b'{"k":2}', {"X-Api-Key": "s3cret-app-key"})[0] == 200
        status, headers, body = http("GET", srv.url + "/collect.gif?k=3&api_key=s3cret-web-key")
        assert status == 200 and headers["Content-Type"] == "image/gif" and body.startswith(b"GIF89a")
        status, headers, _ = http("OPTIONS", srv.url + "/collect", headers={
            "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-api-key"})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert metric(srv, "http_requests_api_key_total", key_name="web") == 2
        assert metric(srv, "http_requests_api_key_total", key_name="app") == 1
        assert metric(srv, "http_requests_rejected_total", reason="auth_missing") == 1
        assert metric(srv, "http_requests_rejected_total", reason="auth_invalid") == 1
    finally:
        assert srv.stop() == 0
    bodies = sorted(delivered_bodies(tmp_path / "data"))
    assert bodies == ['k=3', '{"k":1}', '{"k":2}']
    assert "s3cret" not in srv.log()
    assert not any("s3cret" in b for b in bodies)
