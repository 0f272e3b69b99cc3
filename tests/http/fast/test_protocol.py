"""The httptools front's connections (HTTP_FRONT=fast, estat_ingest/http/fast/protocol.py) as
`estat-ingest serve` runs them: a real server process on 127.0.0.1, raw sockets. The edge policy
as this front applies it: header limits (431), body and header deadlines (408, closed), the
in-flight cap (503), chunked bodies, pipelining, malformed HTTP (400 + counter + rate-limited log),
routes and HEAD. Assertions are on status codes, counters and the events in the sink files, never
on timing."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import HELD_REST, ServerProcess, file_objects, hold_posts, http, records_of

FAST = {"HTTP_FRONT": "fast", "FLUSH_INTERVAL": "200ms"}

Answer = tuple[int, dict[str, str], bytes]


def metric(srv: ServerProcess, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(http("GET", srv.url + "/metrics")[2].decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def read_answers(sock: socket.socket, expect: int, heads: tuple[bool, ...] = ()) -> tuple[list[Answer], bool]:
    """Up to `expect` answers from `sock` (100 Continue skipped), and whether the server then
    closed the connection. `heads[i]`: answer i is to a HEAD request (no body follows)."""
    buf = b""
    out: list[Answer] = []
    closed = False

    def more() -> bool:
        nonlocal buf, closed
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            closed = True
            return False
        buf += chunk
        return True

    while len(out) < expect:
        while b"\r\n\r\n" not in buf:
            if not more():
                return out, closed
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if status == 100:
            continue
        size = 0 if (len(heads) > len(out) and heads[len(out)]) else int(headers.get("content-length", "0"))
        while len(buf) < size:
            if not more():
                return out, closed
        out.append((status, headers, buf[:size]))
        buf = buf[size:]
    if not buf:
        sock.settimeout(0.5)  # only to see whether a close follows right after the last answer
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return out, closed


def talk(srv: ServerProcess, data: bytes, expect: int = 1, heads: tuple[bool, ...] = (),
         timeout: float = 20.0) -> tuple[list[Answer], bool]:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(data)
        return read_answers(s, expect, heads)


def post(body: bytes, extra: bytes = b"", path: bytes = b"/collect") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def delivered(root: Path) -> list[str]:
    return [r["body"] for _, r in records_of(file_objects(root))] if root.exists() else []


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("fast-front-limits")
    srv = ServerProcess({**FAST, "FILE_SINK_DIR": str(tmp / "data"), "DLQ_DIR": str(tmp / "dlq"),
                         "MAX_BODY_SIZE": "1000", "MAX_HEADER_BYTES": "2048", "MAX_HEADERS": "20",
                         "REQUEST_READ_TIMEOUT": "1s", "HEADER_READ_TIMEOUT": "1s"}, tmp)
    try:
        srv.start()
        yield srv
    finally:
        code = srv.stop() if srv.proc is not None and srv.proc.poll() is None else -1
        srv.kill()
        assert code == 0, srv.log()[-3000:]


def test_header_limits_answer_431_and_count(limits: ServerProcess) -> None:
    srv = limits
    before = metric(srv, "http_requests_rejected_total", reason="header_too_large")
    cases = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2100 + b"\r\n\r\n",  # one line over
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(21)) + b"\r\n",
        b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a request line over 8190, no query
        # a repeated name counts each of its lines, and each of its lines has the line cap
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Same: v\r\n" * 20 + b"\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Same: v\r\nX-Same: " + b"a" * 2100 + b"\r\n\r\n",
    ]
    for data in cases:
        answers, closed = talk(srv, data)
        assert [a[0] for a in answers] == [431] and closed
        assert answers[0][1]["connection"] == "close"
    # a header line that never ends, sent in pieces: refused while it is still arriving (the
    # parser would otherwise buffer it without a bound)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(b"POST /collect HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        status = 0
        try:
            for _ in range(200):
                s.sendall(b"z" * 4096)
        except OSError:
            pass  # the server closed on us: its answer may still be readable, or lost to the reset
        answers, closed = read_answers(s, 1)
        status = answers[0][0] if answers else 0
        assert status in (431, 0) and closed
    # exactly at the limits is fine: 20 headers, a 2048-byte line (name + value)
    ok = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"o" * (2048 - 4) + b"\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(18)) + b"\r\n"
    assert [a[0] for a in talk(srv, ok)[0]] == [200]
    same = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Same: v\r\n" * 19 + b"\r\n"  # 20 lines, one name
    assert [a[0] for a in talk(srv, same)[0]] == [200]
    assert metric(srv, "http_requests_rejected_total", reason="header_too_large") - before == 6


def test_bodies_over_the_cap_are_413_without_reading_them(limits: ServerProcess) -> None:
    srv = limits
    before = metric(srv, "http_requests_rejected_body_too_large_total")
    # announced too large: answered before any body byte is sent
    answers, closed = talk(srv, b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
    assert [a[0] for a in answers] == [413] and closed
    # chunked, passing the cap while it streams
    chunked = (b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(4)) + b"0\r\n\r\n")
    answers, closed = talk(srv, chunked)
    assert [a[0] for a in answers] == [413] and closed
    # a GET whose query (the payload) is over the request-line bound: 413, not a parser error
    answers, _ = talk(srv, b"GET /collect?" + b"q" * 6000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [a[0] for a in answers] == [413]
    assert metric(srv, "http_requests_rejected_body_too_large_total") - before == 3


def test_malformed_http_is_400_counted_and_logged_rate_limited(limits: ServerProcess) -> None:
    srv = limits
    before = metric(srv, "http_requests_rejected_total", reason="bad_http")
    cases = [b"THIS IS NOT HTTP\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
             b"POST /collect HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
             b"POST /collect HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
             b"GET /health HTTP/1.1\nHost: x\n\n", b"GET /health HTTP/1.1\r\n\r\n",  # bare LF; no Host
             b"GET /collect?s=" + "é".encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"]  # raw UTF-8: encode it
    for data in cases * 5:
        answers, closed = talk(srv, data)
        assert [a[0] for a in answers] == [400] and closed, data
    assert metric(srv, "http_requests_rejected_total", reason="bad_http") - before == len(cases) * 5
    assert metric(srv, "http_requests_rejected_total", reason="server_error") == 0
    lines = [r for r in srv.log_records() if r.get("message") == "malformed request rejected"]
    assert 1 <= len(lines) <= 2  # one line per reason per 10 s (the module's earlier tests: none)
    assert "Traceback" not in srv.log()
    assert http("GET", srv.url + "/health")[0] == 200


def test_routes_methods_and_head(limits: ServerProcess) -> None:
    srv = limits
    reqs = (b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"POST /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + b"HEAD /collect HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    answers, closed = talk(srv, reqs, 6, heads=(True, False, False, False, True, False))
    assert [a[0] for a in answers] == [200, 200, 405, 404, 405, 200] and not closed
    assert answers[0][1]["content-length"] == "2" and answers[0][2] == b""  # HEAD: no body follows
    assert answers[1][2] == b"ok" and answers[5][2] == b"ready"
    assert answers[2][1]["allow"] == "GET,HEAD"
    assert answers[4][1]["allow"] == "GET, POST, OPTIONS"
    status, headers, body = http("GET", srv.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=") and b"ingest_ready 1.0" in body


def test_keep_alive_asked_on_any_connection_line_is_announced(limits: ServerProcess) -> None:
    """An HTTP/1.0 client keeps its connection only when the answer says `Connection: keep-alive`:
    llhttp keeps it when any Connection line has the token, so the answer must say so whichever
    line had it (found by `make fuzz`: a second line without the token left it unannounced)."""
    srv = limits
    tail = b"GET /health HTTP/1.0\r\n\r\n"  # no keep-alive: answered, then closed
    for lines in (b"Connection: keep-alive, Upgrade\r\nConnection: dup\r\n",
                  b"Connection: other\r\nConnection: keep-alive\r\n",
                  b"Connection: keep-alive\r\nConnection: keep-alive\r\n"):
        first = b"GET /health HTTP/1.0\r\n" + lines + b"\r\n"
        answers, closed = talk(srv, first + tail, 2)
        assert [a[0] for a in answers] == [200, 200] and closed, lines
        assert answers[0][1].get("connection") == "keep-alive", lines
        assert "connection" not in answers[1][1] or answers[1][1]["connection"] == "close", lines
    # HTTP/1.1 with close on one of its lines: answered with `Connection: close`, then closed
    answers, closed = talk(srv, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: other\r\nConnection: close\r\n\r\n"
                           + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 2)
    assert [a[0] for a in answers] == [200] and closed
    assert answers[0][1]["connection"] == "close"


def test_a_target_sent_again_is_routed_as_the_first_time(limits: ServerProcess) -> None:
    """Query-less targets are remembered once routed (protocol.py `_PATHS`): each of these is sent
    twice on one connection, so the second answer comes through the remembered path."""
    srv = limits
    for target, status in ((b"/health", 200), (b"/health#top", 200), (b"http://x/health", 200),
                           (b"/nope", 404), (b"/healt%68", 400), (b"/health?x=1", 200)):
        req = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        answers, _ = talk(srv, req * 2, 2 if status != 400 else 1)
        assert [a[0] for a in answers] == [status] * (2 if status != 400 else 1), target
        if status == 200:
            assert [a[2] for a in answers] == [b"ok", b"ok"], target
    # the refused target is refused again on a connection of its own, not routed from memory
    again, closed = talk(srv, b"GET /healt%68 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [a[0] for a in again] == [400] and closed


def test_slow_body_is_408_and_slow_headers_are_closed(limits: ServerProcess) -> None:
    srv = limits
    before_408 = metric(srv, "http_requests_rejected_total", reason="read_timeout")
    before_hdr = metric(srv, "http_requests_rejected_total", reason="header_timeout")
    socks = []
    try:
        slow_body = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        slow_body.sendall(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"slow\":")
        slow_head = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        slow_head.sendall(b"POST /collect HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # a kept-alive connection whose next request never finishes its headers is closed too
        later = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
        later.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answers(later, 1)[0][0][0] == 200
        later.settimeout(20)
        later.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks = [slow_body, slow_head, later]
        answers, closed = read_answers(slow_body, 1)
        assert [a[0] for a in answers] == [408] and closed
        for s in (slow_head, later):
            s.settimeout(20)
            assert s.recv(4096) == b""  # closed without an answer
    finally:
        for s in socks:
            s.close()
    assert metric(srv, "http_requests_rejected_total", reason="read_timeout") - before_408 == 1
    assert metric(srv, "http_requests_rejected_total", reason="header_timeout") - before_hdr == 2


def test_pipelined_chunked_and_100_continue_bodies_are_stored_once(tmp_path: Path, spawn: Any) -> None:
    data = tmp_path / "data"
    srv = spawn({**FAST, "FILE_SINK_DIR": str(data), "DLQ_DIR": str(tmp_path / "dlq")}, tmp_path)
    tag = uuid.uuid4().hex[:8]
    events = [orjson.dumps({"tag": tag, "n": i}) for i in range(3)]
    try:
        # three pipelined POSTs and a GET event in one write: four 200s, in order, one connection
        answers, closed = talk(srv, b"".join(post(e) for e in events)
                               + f"GET /collect?tag={tag}&n=3&u=%C3%A9%20 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 4)
        assert [a[0] for a in answers] == [200] * 4 and not closed
        # chunked body in uneven pieces, with Expect: 100-continue
        body = orjson.dumps({"tag": tag, "n": 4, "s": "chunked é"})
        pieces = [body[:5], body[5:6], body[6:]]
        chunked = (b"POST /collect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
        assert [a[0] for a in talk(srv, chunked)[0]] == [200]
        # a non-UTF-8 User-Agent byte is stored as U+FFFD; a fragment is not part of the event
        raw = f"GET /collect?tag={tag}&n=5#frag HTTP/1.1\r\nHost: x\r\nUser-Agent: a\xffb\r\n\r\n".encode("latin-1")
        assert [a[0] for a in talk(srv, raw)[0]] == [200]
        # an absolute-form target reaches /collect; a percent-encoded path is refused, never decoded
        # (tests/http/test_framing.py::test_percent_encoded_path_is_refused)
        absolute = f"GET http://x/collect?tag={tag}&n=6 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert [a[0] for a in talk(srv, absolute)[0]] == [200]
        encoded = f"GET http://x/%63ollect?tag={tag}&n=encoded HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert [a[0] for a in talk(srv, encoded)[0]] == [400]
        # nothing after `Connection: close` is read: the second event is never stored
        lost = orjson.dumps({"tag": tag, "n": "after-close"})
        answers, closed = talk(srv, post(orjson.dumps({"tag": tag, "n": 7}), b"Connection: close\r\n") + post(lost), 2)
        assert [a[0] for a in answers] == [200] and closed
    finally:
        assert srv.stop() == 0
    recs = [r for _, r in records_of(file_objects(data)) if tag in r["body"]]
    bodies = sorted(r["body"] for r in recs)
    last = orjson.dumps({"tag": tag, "n": 7}).decode()
    assert bodies == sorted([e.decode() for e in events] + [
        f"tag={tag}&n=3&u=%C3%A9%20", body.decode(), f"tag={tag}&n=5", f"tag={tag}&n=6", last])
    assert [r["user_agent"] for r in recs if r["body"].endswith("n=5")] == ["a\ufffdb"]


def test_in_flight_cap_answers_503_then_recovers(tmp_path: Path, spawn: Any) -> None:
    data = tmp_path / "data"
    srv = spawn({**FAST, "FILE_SINK_DIR": str(data), "DLQ_DIR": str(tmp_path / "dlq"), "MAX_IN_FLIGHT": "3",
                 "REQUEST_READ_TIMEOUT": "60s"}, tmp_path)
    held = hold_posts(srv.port, 3, timeout=20)
    try:
        accepted = []  # until the server has read the three held requests' headers
        for i in range(400):
            event = orjson.dumps({"over": i})
            answers, closed = talk(srv, post(event))
            if answers[0][0] != 200:
                break
            accepted.append(event.decode())
        assert [a[0] for a in answers] == [503] and closed
        assert answers[0][1]["retry-after"] == "1"
        assert metric(srv, "http_requests_rejected_total", reason="overloaded") == 1
        assert http("GET", srv.url + "/health")[0] == 200  # other routes are not capped
        for s in held:
            s.sendall(HELD_REST)
        for s in held:
            assert [a[0] for a in read_answers(s, 1)[0]] == [200]
        assert srv.post(b'{"after":1}')[0] == 200
    finally:
        for s in held:
            s.close()
        assert srv.stop() == 0
    assert sorted(delivered(data)) == sorted(['{"a":"b"} '] * 3 + ['{"after":1}'] + accepted)


def test_repeated_header_lines_reach_collect_as_the_aiohttp_front_gives_them(tmp_path: Path, spawn: Any) -> None:
    """The fast front hands /collect a dict of lower-case names, and a multidict only when a name
    repeats: every X-Forwarded-For line is walked (joined in order), a repeated single-value
    header gives its first line, names match in any case, and a repeated framing header is still
    refused (400, nothing stored)."""
    data = tmp_path / "data"
    srv = spawn({**FAST, "FILE_SINK_DIR": str(data), "DLQ_DIR": str(tmp_path / "dlq")}, tmp_path)
    tag = uuid.uuid4().hex[:8]
    try:
        repeated = post(orjson.dumps({"tag": tag, "n": "repeated"}),
                        b"x-forwarded-for: 198.51.100.1, 203.0.113.5\r\nUSER-AGENT: first\r\n"
                        b"X-Forwarded-For: 203.0.113.9\r\nUser-Agent: second\r\ncOOkie: a=1\r\n")
        plain = post(orjson.dumps({"tag": tag, "n": "plain"}), b"X-FORWARDED-FOR: 203.0.113.7\r\nuser-agent: only\r\n")
        behind = post(orjson.dumps({"tag": tag, "n": "behind"}),
                      b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 10.0.0.7\r\n")
        answers, closed = talk(srv, repeated + plain + behind, 3)
        assert [a[0] for a in answers] == [200, 200, 200] and not closed
        dup_type = post(orjson.dumps({"tag": tag, "n": "dup"}), b"content-type: application/json\r\n")
        answers, closed = talk(srv, dup_type)
        assert [a[0] for a in answers] == [400] and closed
    finally:
        assert srv.stop() == 0
    recs = {orjson.loads(r["body"])["n"]: r for _, r in records_of(file_objects(data)) if tag in r["body"]}
    assert sorted(recs) == ["behind", "plain", "repeated"]
    # the loopback peer is a trusted proxy: the walk from the right stops at the first public address
    assert (recs["repeated"]["ip"], recs["repeated"]["user_agent"], recs["repeated"]["cookie"]) == (
        "203.0.113.9", "first", "a=1")
    assert (recs["plain"]["ip"], recs["plain"]["user_agent"]) == ("203.0.113.7", "only")
    assert recs["behind"]["ip"] == "198.51.100.1"  # the second line alone would give the private hop
