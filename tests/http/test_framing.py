"""HTTP/1.1 framing and connection management of both fronts (issue 15, DESIGN.md §2 invariant 5),
one test per finding of the security battery, against a real `estat-ingest serve` over raw sockets.

Each test asserts the WANTED behaviour, on what the server answers (status, version, `Connection`,
whether the connection is kept) and on what it stored (the file sink's objects, decompressed):
- an Upgrade or CONNECT request is a plain request to an ingest server: it is answered, and the
  connection is either kept (the next request on it is served) or the answer says
  `Connection: close` (RFC 9112 §9.6) — a proxy's connection pool must never meet a silent close;
- the body of an `Upgrade: h2c` POST (what `curl --http2` sends) is stored;
- `Expect` is ignored in HTTP/1.0 requests (RFC 9110 §10.1.1);
- duplicate framing-relevant headers (Host, Transfer-Encoding, Content-Length, Content-Type,
  Content-Encoding) are 400 and the connection is closed (RFC 9112 §3.2, §6.3; RFC 9110 §5.3);
- an HTTP/1.0 request with Transfer-Encoding is followed by a close (RFC 9112 §6.1); chunk
  extensions are bounded;
- an HTTP/1.0 connection held open is announced with `Connection: keep-alive` (RFC 9112 §9.3,
  appendix C.2.2), else the server closes after the answer;
- no `100 Continue` before a refusal; a valid request followed by a malformed one in the same
  segment: the valid one is answered and stored.
Waits are bounded (rawhttp.WAIT_S); nothing is timed.
"""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest

from tests.helpers import ServerProcess, SinkReader, running
from tests.http.rawhttp import Answer, Conn, finals

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)
MAX = 16384


@dataclass
class Served:
    srv: ServerProcess
    store: SinkReader

    def stored(self, marker: str) -> list[str]:
        """The stored bodies that carry `marker` (after a barrier)."""
        return [b for b in self.store.bodies() if marker in b]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(f"framing-{front}")
    env = {**SinkReader.SERVER_ENV, "FILE_SINK_DIR": str(tmp / "data"), "DLQ_DIR": str(tmp / "dlq"),
           "MAX_BODY_SIZE": str(MAX), "REQUEST_READ_TIMEOUT": "2s", "HEADER_READ_TIMEOUT": "2s"}
    with running(env, tmp) as srv:
        yield Served(srv, SinkReader(srv, tmp / "data", tmp / "dlq"))


def event(**extra: object) -> tuple[str, bytes]:
    """A unique marker and a JSON body that carries it."""
    marker = uuid.uuid4().hex
    return marker, orjson.dumps({"m": marker, **extra})


def post(body: bytes, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    host = b"Host: x\r\n" if version == b"1.1" else b""
    return (b"POST /collect HTTP/" + version + b"\r\n" + host + b"Content-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def chunked(body: bytes, size_line_extra: bytes = b"") -> bytes:
    return b"%x" % len(body) + size_line_extra + b"\r\n" + body + b"\r\n0\r\n\r\n"


def statuses(answers: list[Answer]) -> list[int]:
    return [a.status for a in answers]


def show(answers: list[Answer]) -> str:
    return "; ".join(str(a) for a in answers) or "no answer"


def served_on(c: Conn, answer: Answer, follow: bytes, pipelined: bool) -> bool:
    """After `answer`, is the connection still serving requests? The follow-up request (already
    sent when `pipelined`) must then be answered; after an announced close it must not be."""
    if answer.announces_close:
        if not pipelined:
            c.send(follow)
        assert c.wait_closed(), f"answered {answer} but kept the connection open"
        assert finals(c.received)[-1] is answer, f"served a request after announcing close: {show(c.received)}"
        return False
    if not pipelined:
        assert c.send(follow), f"the server closed after {answer} without Connection: close"
    got = finals(c.answers(1))
    assert got, (f"answered {answer} without `Connection: close`, then "
                 f"{'closed the connection' if c.closed else 'stopped answering'} (RFC 9112 §9.6)")
    assert got[0].status == 200, show(got)
    return True


# ---------------------------------------------------------------- finding 1: Upgrade / CONNECT

UPGRADES = {
    "get-upgrade-foo": b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n",
    "options-upgrade-websocket": (b"OPTIONS /collect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                  b"Upgrade: websocket\r\n\r\n"),
    "connect": b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["next-after-answer", "next-in-same-segment"])
@pytest.mark.parametrize("shape", list(UPGRADES))
def test_f1_upgrade_request_is_a_plain_request(served: Served, shape: str, pipelined: bool) -> None:
    """Finding 1: after an upgrade-looking request the connection is either kept (the next request,
    a POST, is answered and stored) or the answer says `Connection: close`."""
    marker, body = event()
    follow = post(body)
    with Conn(served.srv.port) as c:
        c.send(UPGRADES[shape] + (follow if pipelined else b""))
        first = finals(c.answers(1))
        assert first, f"no answer to the {shape} request"
        assert first[0].status != 101 and first[0].status < 500, first[0]
        kept = served_on(c, first[0], follow, pipelined)
        c.finish()
    assert len(served.stored(marker)) == (1 if kept else 0)


# ---------------------------------------------------------------- finding 2: h2c upgrade with a body

def test_f2_h2c_upgrade_post_body_is_stored(served: Served) -> None:
    """Finding 2: `curl --http2 -d ... http://…/collect` sends `Upgrade: h2c` with its body; the server
    answers in HTTP/1.1 (no switch) and stores the body exactly as sent."""
    marker, body = event(t=1)
    req = (b"POST /collect HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n"
           b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
           b"Content-Length: %d\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n"
           % (served.srv.port, len(body)) + body)
    with Conn(served.srv.port) as c:
        c.send(req)
        got = finals(c.answers(1))
        assert statuses(got) == [200], show(got)
        assert got[0].version == "HTTP/1.1"
        served_on(c, got[0], b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", pipelined=False)
        c.finish()
    assert served.stored(marker) == [body.decode()]


# ---------------------------------------------------------------- finding 3: Expect in HTTP/1.0

def test_f3_http10_expect_gets_no_100_continue(served: Served) -> None:
    """Finding 3: RFC 9110 §10.1.1 — a server MUST ignore `Expect: 100-continue` in an HTTP/1.0
    request (an HTTP/1.0 client does not know 1xx answers)."""
    marker, body = event()
    with Conn(served.srv.port) as c:
        c.send(post(body, b"1.0", b"Expect: 100-continue\r\n"))
        got = c.answers(1)  # the final answer and any 1xx before it
        assert c.wait_closed()
    assert statuses(got) == [200], f"answers to an HTTP/1.0 Expect request: {show(got)}"
    assert served.stored(marker) == [body.decode()]


# ---------------------------------------------------------------- finding 4: duplicate framing headers

def _dup_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (request, marker of the event it would store if it were accepted)."""
    out: dict[str, tuple[bytes, str]] = {}
    out["host-get"] = (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "")
    m, body = event()
    out["host-post"] = (b"POST /collect HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body, m)
    m, body = event()
    out["transfer-encoding-x-then-chunked"] = (
        b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n" + chunked(body), m)
    m, body = event()
    out["content-length-same-value"] = (
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body)) + body, m)
    m, body = event()
    nd = body + b"\n" + orjson.dumps({"m": m, "line": 2}) + b"\n"
    out["content-type-ndjson-then-json"] = (
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(nd) + nd, m)
    m, body = event()
    gz = gzip.compress(body, mtime=0)
    out["content-encoding-gzip-then-identity"] = (
        b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Encoding: identity\r\nContent-Length: %d\r\n\r\n" % len(gz) + gz, m)
    return out


DUPLICATES = _dup_cases()


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_f4_duplicate_framing_header_is_400_and_close(served: Served, case: str) -> None:
    """Finding 4: two lines of a framing-relevant header are 400 with `Connection: close`, the
    connection ends, nothing of the request nor of a request pipelined behind it is stored."""
    req, marker = DUPLICATES[case]
    marker2, body2 = event()
    with Conn(served.srv.port) as c:
        c.send(req + post(body2))
        got = finals(c.answers(2))
        assert statuses(got)[:1] == [400], f"{case}: {show(got)}"
        assert got[0].announces_close, f"{case}: 400 without Connection: close: {got[0]}"
        assert c.wait_closed(), f"{case}: connection kept after the 400"
        assert len(finals(c.received)) == 1, f"{case}: the pipelined request was answered: {show(c.received)}"
    stored = served.store.bodies()
    assert [b for b in stored if (marker and marker in b) or marker2 in b] == []


# ---------------------------------------------------------------- finding 5: HTTP/1.0 chunked, chunk extensions

@pytest.mark.parametrize("keepalive", [True, False], ids=["keep-alive", "plain"])
def test_f5_http10_chunked_request_closes_the_connection(served: Served, keepalive: bool) -> None:
    """Finding 5a: RFC 9112 §6.1 — an HTTP/1.0 message with Transfer-Encoding has faulty framing; the
    server closes the connection after it, also when it asked for keep-alive, so the request
    pipelined behind it is never served."""
    marker, body = event()
    marker2, body2 = event()
    req = (b"POST /collect HTTP/1.0\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
           + (b"Connection: keep-alive\r\n" if keepalive else b"") + b"\r\n")
    with Conn(served.srv.port) as c:
        c.send(req + chunked(body) + post(body2))
        got = finals(c.answers(2))
        assert got, "no answer"
        assert got[0].announces_close, f"HTTP/1.0 chunked request answered without closing: {got[0]}"
        assert c.wait_closed(), "connection kept after an HTTP/1.0 chunked request"
        assert len(finals(c.received)) == 1, f"the request behind it was served: {show(c.received)}"
    stored = served.store.bodies()
    assert [b for b in stored if marker2 in b] == []
    assert len([b for b in stored if marker in b]) == (1 if got[0].status == 200 else 0)


def test_f5_chunk_extension_is_bounded(served: Served) -> None:
    """Finding 5b: a chunk-size line with a 1 MiB extension (64x MAX_BODY_SIZE; the battery sent
    20 MB) is refused with a 4xx, the connection closed, the event not stored."""
    marker, body = event()
    head = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    with Conn(served.srv.port) as c:
        c.send(head + chunked(body, b";ext=" + b"e" * (1 << 20)))
        got = finals(c.answers(1))
        got += finals(c.finish())
    assert len(got) <= 1 and all(400 <= a.status < 500 for a in got), f"1 MiB chunk extension: {show(got)}"
    assert served.stored(marker) == []


# ---------------------------------------------------------------- finding 6: HTTP/1.0 keep-alive

@pytest.mark.parametrize("path", ["/health", "/collect"])
def test_f6_http10_keepalive_is_announced_or_closed(served: Served, path: str) -> None:
    """Finding 6: an HTTP/1.0 client keeps a connection only when the answer says
    `Connection: keep-alive` (RFC 9112 appendix C.2.2). A connection the server holds open must be
    announced so; else the server closes it after the answer. (The status line may say HTTP/1.1:
    RFC 9110 §2.5 lets a server answer with its own highest minor version.)"""
    marker, body = event()
    if path == "/collect":
        first = post(body, b"1.0", b"Connection: keep-alive\r\n")
    else:
        first = b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    with Conn(served.srv.port) as c:
        c.send(first)
        got = finals(c.answers(1))
        assert statuses(got) == [200], show(got)
        c.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        second = finals(c.answers(1))
        if second:  # the server held the connection open: it must have said so
            assert "keep-alive" in got[0].connection and not got[0].announces_close, (
                f"held an HTTP/1.0 connection open after {got[0]}")
        else:
            assert c.closed, "neither answered the second HTTP/1.0 request nor closed"
            assert "keep-alive" not in got[0].connection, f"promised keep-alive, then closed: {got[0]}"
        c.finish()
    if path == "/collect":
        assert served.stored(marker) == [body.decode()]


# ---------------------------------------------------------------- finding 7: 100 before 413; valid + malformed

def test_f7_no_100_continue_before_413(served: Served) -> None:
    """Finding 7a: `Expect: 100-continue` with an announced body over MAX_BODY_SIZE gets the 413
    alone: a 100 first would invite the client to send the body the server refuses."""
    with Conn(served.srv.port) as c:
        c.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % (MAX * 8))
        got = c.answers(1)
    assert statuses(got) == [413], show(got)
    assert got[0].announces_close


def test_f7_valid_then_malformed_in_one_segment(served: Served) -> None:
    """Finding 7b: a valid POST and a malformed request in the same TCP segment: the valid one is
    answered 200 and stored once; the malformed one gets a 400 (or the close) and nothing else."""
    marker, body = event()
    with Conn(served.srv.port) as c:
        c.send(post(body) + b"NOT HTTP AT ALL\r\n\r\n")
        got = finals(c.answers(2))
        got += finals(c.finish())
    assert statuses(got) in ([200, 400], [200]), show(got)
    assert served.stored(marker) == [body.decode()]


def test_control_plain_keepalive_pipeline_is_served(served: Served) -> None:
    """Control for the tests above: three pipelined POSTs on one HTTP/1.1 connection, all answered
    without closing, all stored once in order."""
    events = [event() for _ in range(3)]
    with Conn(served.srv.port) as c:
        c.send(b"".join(post(b) for _, b in events))
        got = finals(c.answers(3))
        assert statuses(got) == [200, 200, 200] and not any(a.announces_close for a in got)
        c.finish()
    stored = served.store.bodies()
    assert [b for b in stored if any(m in b for m, _ in events)] == [b.decode() for _, b in events]



# ---------------------------------------------------------------- beyond the battery: found while fuzzing

def test_new_request_then_client_half_close_is_answered(served: Served) -> None:
    """A client that sends its request and then its FIN at once (`printf … | nc -N`, HTTP/1.0-era
    clients) still gets the answer: the event is stored, so a client left without the answer
    retries and the event is stored twice."""
    marker, body = event()
    with Conn(served.srv.port) as c:
        c.sock.sendall(post(body))
        got = finals(c.finish())  # half-close right after the request, then read until the close
    assert statuses(got) == [200], f"request followed by FIN: {show(got)}"
    assert served.stored(marker) == [body.decode()]


@pytest.mark.parametrize("closing", ["connection-close", "http10"])
def test_new_valid_request_then_more_bytes_after_its_close(served: Served, closing: str) -> None:
    """RFC 9112 §9.6: after a request that ends the connection (`Connection: close`, or HTTP/1.0
    without keep-alive) the server answers it and ignores what follows — here a pipelined GET in the
    same segment. The first request is answered 200 and stored; nothing else is answered."""
    marker, body = event()
    first = post(body, b"1.1", b"Connection: close\r\n") if closing == "connection-close" else post(body, b"1.0")
    with Conn(served.srv.port) as c:
        c.send(first + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = finals(c.answers(2))
        assert c.wait_closed()
    assert statuses(got) == [200], show(got)
    assert got[0].announces_close
    assert served.stored(marker) == [body.decode()]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_new_connect_with_a_body_is_refused(served: Served, framing: str) -> None:
    """A CONNECT with Content-Length or Transfer-Encoding: RFC 9110 §9.3.6 says CONNECT has no
    content, RFC 9112 §6.3 frames it by those headers, so a proxy and the server can disagree on
    where the next request starts. The server refuses it (4xx, close) and never serves or stores
    a request hidden in its bytes."""
    marker, body = event()
    inner = post(body)
    if framing == "content-length":
        head = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(inner)
        data = head + inner
    else:
        data = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(inner)
    with Conn(served.srv.port) as c:
        c.send(data)
        got = finals(c.answers(2))
        assert got and 400 <= got[0].status < 500, show(got)
        assert got[0].announces_close, f"CONNECT with a body answered without Connection: close: {got[0]}"
        assert c.wait_closed()
        assert len(finals(c.received)) == 1, f"served what followed the CONNECT: {show(c.received)}"
    assert served.stored(marker) == []


def test_new_answer_before_a_broken_body_announces_the_close(served: Served) -> None:
    """A request whose body the server does not need (GET /health, chunked), the body's framing
    broken in a later segment. A server may answer before the body is complete, but then it cannot
    know whether the connection survives: its answer must say `Connection: close`, or it must wait
    for the body and refuse it (400, close). Either way, never a 200 without `Connection: close`
    followed by a silent close — what a proxy's pool turns into another client's failure."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with Conn(served.srv.port) as c:
        c.send(head)
        early = finals(c.answers(1, timeout=0.5))  # a bounded look: answered before the body?
        c.send(b"zz\r\nnot a chunk\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        c.answers(2 - len(early))
        assert c.wait_closed(), f"kept the connection after a broken chunk: {show(c.received)}"
        got = finals(c.received)
    assert got, "closed without an answer"
    first = got[0]
    assert first.announces_close, f"answered {first}, then closed the connection (no Connection: close)"
    assert first.status == 200 or 400 <= first.status < 500, first
    assert len(got) == 1, f"served a request after the broken body: {show(got)}"


@pytest.mark.parametrize("version", [b"2.0", b"0.9"])
def test_new_other_versions_are_read_as_http10(served: Served, version: bytes) -> None:
    """llhttp reads `HTTP/2.0` and `HTTP/0.9` request lines like HTTP/1.0 ones (keep-alive only when
    asked for, no Host needed); aiohttp then answered with an `HTTP/2.0 200 OK` status line on an
    HTTP/1 connection, which no HTTP/1 intermediary expects. Both fronts answer in the HTTP/1.x they
    speak and frame the connection as HTTP/1.0: kept only with `Connection: keep-alive` said back."""
    marker, body = event()
    with Conn(served.srv.port) as c:
        c.send(b"POST /collect HTTP/" + version + b"\r\nHost: x\r\nConnection: keep-alive\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        got = finals(c.answers(1))
        assert statuses(got) == [200] and got[0].version in ("HTTP/1.0", "HTTP/1.1"), show(got)
        served_on(c, got[0], b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", pipelined=False)
        c.finish()
    assert served.stored(marker) == [body.decode()]


@pytest.mark.parametrize("target", [b"/%6Detrics", b"/c%6Fllect?m={m}", b"http://x/%63ollect?m={m}", b"/health%2F"])
def test_percent_encoded_path_is_refused(served: Served, target: bytes) -> None:
    """Both fronts used to percent-decode the path before routing: `GET /%6Detrics` served /metrics,
    past a proxy rule that blocks /metrics by its bytes. A path is routed as sent and an encoded one
    refused (400, close; docs/security.md); nothing is stored. The query is not the path: `%` there
    is part of the event, stored as sent."""
    marker, _ = event()
    with Conn(served.srv.port) as c:
        c.send(b"GET " + target.replace(b"{m}", marker.encode()) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        got = finals(c.answers(1))
        assert c.wait_closed()
    assert statuses(got) == [400] and got[0].announces_close, show(got)
    assert b"http_requests_total" not in got[0].body
    with Conn(served.srv.port) as c:
        c.send(b"GET /collect?m=" + marker.encode() + b"&u=%2Fhome%20x HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        got = finals(c.answers(2))
        c.finish()
    assert statuses(got) == [200, 200] and b"http_requests_total" in got[1].body, show(got)
    assert served.stored(marker) == [f"m={marker}&u=%2Fhome%20x"]


# ---------------------------------------------------------------- ACK_MODE=durable: answers that wait

@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(f"framing-durable-{front}")
    env = {**SinkReader.SERVER_ENV, "FILE_SINK_DIR": str(tmp / "data"), "DLQ_DIR": str(tmp / "dlq"),
           "MAX_BODY_SIZE": str(MAX), "REQUEST_READ_TIMEOUT": "2s", "HEADER_READ_TIMEOUT": "2s", "ACK_MODE": "durable",
           "SPOOL_DIR": str(tmp / "spool")}  # not under DLQ_DIR, which SinkReader asserts stays empty
    with running(env, tmp) as srv:
        yield Served(srv, SinkReader(srv, tmp / "data", tmp / "dlq"))


REFUSED_AFTER = {
    "not-http": b"NOT HTTP AT ALL\r\n\r\n",
    "duplicate-host": b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "over-limit": b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX * 8),
}


@pytest.mark.parametrize("refused", list(REFUSED_AFTER))
def test_durable_answers_stay_in_request_order_before_a_refusal(durable: Served, refused: str) -> None:
    """With ACK_MODE=durable an accepted POST is answered once the spool fsync covering it returned,
    later than a refusal of the request pipelined behind it could be written. The answers must still
    come in request order (a proxy matches answers to requests by their order): 200, 200, then the
    4xx with `Connection: close`, and both events stored."""
    events = [event() for _ in range(2)]
    with Conn(durable.srv.port) as c:
        c.send(b"".join(post(b) for _, b in events) + REFUSED_AFTER[refused])
        got = finals(c.answers(3))
        assert c.wait_closed()
    assert statuses(got)[:2] == [200, 200] and len(got) == 3 and 400 <= got[2].status < 500, show(got)
    assert got[2].announces_close and not any(a.announces_close for a in got[:2])
    stored = durable.store.bodies()
    assert [b for b in stored if any(m in b for m, _ in events)] == [b.decode() for _, b in events]


@pytest.mark.parametrize("coding", ["x, chunked", "chunked, x", "gzip, chunked", "identity"])
def test_new_a_transfer_coding_other_than_chunked_is_refused(served: Served, coding: str) -> None:
    """`Transfer-Encoding: x, chunked` is framed by its last coding by llhttp, which both fronts
    use, so its body was stored although no one can decode it; h11 refuses it (found by make fuzz).
    RFC 9112 §6.1: a coding the server does not understand is refused: 400, close, nothing stored."""
    marker, body = event()
    with Conn(served.srv.port) as c:
        c.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: %s\r\n\r\n" % coding.encode() + chunked(body))
        got = finals(c.answers(1))
        assert statuses(got) == [400], show(got)
        assert got[0].announces_close, show(got)
        assert c.wait_closed()
    assert served.stored(marker) == []


def test_new_chunked_in_any_case_is_chunked(served: Served) -> None:
    """The coding name is case-insensitive (RFC 9112 §7): `Chunked` frames the body like `chunked`."""
    marker, body = event()
    with Conn(served.srv.port) as c:
        c.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: Chunked\r\n\r\n" + chunked(body))
        got = finals(c.answers(1))
    assert statuses(got) == [200], show(got)
    assert served.stored(marker) == [body.decode()]
