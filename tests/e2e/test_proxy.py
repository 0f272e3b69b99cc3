"""Both fronts behind haproxy with a shared backend connection pool (issue 15, finding 1).

haproxy (Debian's package, started and stopped by the fixture, config in a tmp dir) listens on
127.0.0.1 and forwards to `estat-ingest serve` with `http-reuse always` and one backend connection
at a time, so requests of different clients share connections — what an ALB or a CDN does.
Several client threads at once mix valid keep-alive POSTs with malformed requests (the Upgrade
request of finding 1, an h2c upgrade POST, CONNECT, duplicate Content-Length, broken chunked,
HTTP/1.0 chunked, obfuscated Transfer-Encoding). haproxy tags each client with an address from
192.0.2.0/24 (TEST-NET-1, via `http-request set-src` from a test header, so every socket stays on
127.0.0.1) and `option forwardfor` passes it on; the server trusts only haproxy (TRUSTED_PROXIES).

Asserted on what was stored and answered:
- every valid POST of a well-behaved client is answered 200 (finding 1: none may fail because
  another client's request left a backend connection closed without `Connection: close`);
- every event answered 2xx is stored exactly once, byte for byte; every stored event is exactly the
  body of one valid request (no client's bytes inside another client's event); nothing of a
  malformed request is ever stored;
- each stored event's `ip` is the address haproxy put in X-Forwarded-For for its client, also
  when the client forged an X-Forwarded-For of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from tests.helpers import ServerProcess, SinkReader, free_port, running, terminate
from tests.http.rawhttp import BadAnswer, Conn, finals

FRONTS = ("aiohttp", "fast")
GOOD_CLIENTS = 4
POSTS_PER_GOOD_CLIENT = 40
BAD_ROUNDS = 20

HAPROXY_CFG = """\
global
    maxconn 512
    log stdout format raw daemon
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 10s
    timeout server 5s
    timeout http-keep-alive 10s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{front_port}
    http-request set-src hdr(x-test-client)
    http-request del-header x-test-client
    option forwardfor
    default_backend be
backend be
    http-reuse always
    server ingest 127.0.0.1:{back_port} maxconn 1
"""


@dataclass
class Proxy:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Tally:
    """Every request a client sent, by its event body: the answer status (0 = none)."""

    valid: dict[str, tuple[int, str]] = field(default_factory=dict)  # body -> (status, client ip)
    malformed: list[str] = field(default_factory=list)  # markers that must never be stored
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[tuple[ServerProcess, SinkReader]]:
    tmp = tmp_path_factory.mktemp(f"proxy-{front}")
    env = {**SinkReader.SERVER_ENV, "FILE_SINK_DIR": str(tmp / "data"), "DLQ_DIR": str(tmp / "dlq"),
           "TRUSTED_PROXIES": "127.0.0.1/32", "REQUEST_READ_TIMEOUT": "2s", "HEADER_READ_TIMEOUT": "3s"}
    with running(env, tmp) as srv:
        yield srv, SinkReader(srv, tmp / "data", tmp / "dlq")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, backend: tuple[ServerProcess, SinkReader]) -> Iterator[Proxy]:
    binary = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if binary is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy; `make test` installs it as root)")
    tmp = tmp_path_factory.mktemp("haproxy")
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(front_port=port, back_port=backend[0].port))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        pytest.skip(f"this haproxy cannot run the test's configuration: {check.stdout}{check.stderr}"[:500])
    log = tmp / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                Conn(port, timeout=1).sock.close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"haproxy could not run here: {log.read_text(errors='replace')[-500:]}")
                time.sleep(0.05)
        yield Proxy(port, proc, log)
    finally:
        terminate(proc)


def post(body: bytes, client_ip: str, extra: bytes = b"") -> bytes:
    return (b"POST /collect HTTP/1.1\r\nHost: ingest\r\nX-Test-Client: " + client_ip.encode() + b"\r\n"
            b"Content-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def good_client(port: int, ip: str, tally: Tally, forged_xff: bool) -> None:
    """Keep-alive POSTs, one at a time, reconnecting whenever haproxy closes."""
    conn: Conn | None = None
    try:
        for i in range(POSTS_PER_GOOD_CLIENT):
            body = orjson.dumps({"good": uuid.uuid4().hex, "client": ip, "n": i})
            extra = b"X-Forwarded-For: 6.6.6.6\r\n" if forged_xff else b""
            if conn is None or conn.closed:
                if conn is not None:
                    conn.sock.close()
                conn = Conn(port, timeout=10)
            status = 0
            if conn.send(post(body, ip, extra)):
                try:
                    got = finals(conn.answers(1))
                    status = got[0].status if got else 0
                    if got and got[0].announces_close:
                        conn.closed = True  # reconnect for the next one
                except BadAnswer:
                    conn.closed = True
            with tally.lock:
                tally.valid[body.decode()] = (status, ip)
    finally:
        if conn is not None:
            conn.sock.close()


def bad_requests(ip: str) -> list[tuple[bytes, str | None, str | None]]:
    """(bytes, marker of an event that must never be stored, body of an event that may be stored).

    Never stored: what no HTTP/1.1 reading can frame (two different Content-Lengths, a chunk size
    that is not hex). May be stored (once, byte for byte, whatever the answer): a valid POST after
    an Upgrade request, the h2c POST, and the shapes RFC 9112 lets a proxy resolve (Content-Length
    with Transfer-Encoding is read by the chunked framing alone, §6.1; `x, chunked` is chunked)."""
    evil = uuid.uuid4().hex
    ev = orjson.dumps({"evil": evil})
    upgrade_then = orjson.dumps({"after_upgrade": uuid.uuid4().hex, "client": ip})
    h2c = orjson.dumps({"h2c": uuid.uuid4().hex, "client": ip})
    te_x = orjson.dumps({"te_x_chunked": uuid.uuid4().hex, "client": ip})
    cl_te = orjson.dumps({"cl_and_te": uuid.uuid4().hex, "client": ip})
    tag = b"X-Test-Client: " + ip.encode() + b"\r\n"
    upgrade = b"GET /health HTTP/1.1\r\nHost: x\r\n" + tag + b"Connection: Upgrade\r\nUpgrade: foo\r\n\r\n"
    return [
        *[(upgrade, None, None)] * 3,  # finding 1's request, the one that broke other clients' POSTs
        (post(upgrade_then, ip), None, upgrade_then.decode()),
        (b"POST /collect HTTP/1.1\r\nHost: x\r\n" + tag + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
         b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n" % len(h2c) + h2c, None, h2c.decode()),
        (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n" + tag + b"\r\n", None, None),
        (b"POST /collect HTTP/1.1\r\nHost: x\r\n" + tag + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
         % (len(ev), len(ev) + 1) + ev + b"}", evil, None),
        (b"POST /collect HTTP/1.1\r\nHost: x\r\n" + tag + b"Transfer-Encoding: chunked\r\n\r\n"
         b"zz\r\n" + ev + b"\r\n0\r\n\r\n", evil, None),
        (b"POST /collect HTTP/1.1\r\nHost: x\r\n" + tag + b"Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"%x\r\n" % len(te_x) + te_x + b"\r\n0\r\n\r\n", None, te_x.decode()),
        (b"POST /collect HTTP/1.1\r\nHost: x\r\n" + tag + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"%x\r\n" % len(cl_te) + cl_te + b"\r\n0\r\n\r\n", None, cl_te.decode()),
    ]


def bad_client(port: int, ip: str, tally: Tally) -> None:
    """Each request of `bad_requests` on a fresh connection, every round; the answers are read and
    noted for the valid ones, whatever they are for the rest."""
    for _ in range(BAD_ROUNDS):
        for data, evil, valid in bad_requests(ip):
            with Conn(port, timeout=3) as c:
                status = 0
                if c.send(data):
                    try:
                        got = finals(c.answers(1))
                        status = got[0].status if got else 0
                    except BadAnswer:
                        status = 0
                with tally.lock:
                    if evil is not None:
                        tally.malformed.append(evil)
                    if valid is not None:
                        tally.valid[valid] = (status, ip)


def test_shared_backend_connections_never_mix_clients(proxy: Proxy, backend: tuple[ServerProcess, SinkReader]) -> None:
    _, store = backend
    tally = Tally()
    threads = [threading.Thread(target=good_client, args=(proxy.port, f"192.0.2.{10 + i}", tally, i % 2 == 1),
                                name=f"good-{i}") for i in range(GOOD_CLIENTS)]
    threads += [threading.Thread(target=bad_client, args=(proxy.port, f"192.0.2.{100 + i}", tally),
                                 name=f"bad-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread did not finish"
    assert proxy.proc.poll() is None, proxy.log.read_text(errors="replace")[-2000:]

    records = store.sync()
    stored = [r["body"] for r in records]
    counts: dict[str, int] = {}
    for b in stored:
        counts[b] = counts.get(b, 0) + 1

    good = {b: s for b, s in tally.valid.items() if '"good"' in b}
    assert len(good) == GOOD_CLIENTS * POSTS_PER_GOOD_CLIENT
    failed = {b: s for b, (s, _) in good.items() if s != 200}
    # nothing but whole valid bodies, each at most once, and never a malformed request's bytes
    foreign = [b for b in stored if b not in tally.valid]
    assert foreign == [], f"stored events that are not one client's valid body: {foreign[:5]}"
    assert [b for b, n in counts.items() if n > 1] == [], "an event stored twice"
    assert [m for m in tally.malformed if any(m in b for b in stored)] == [], "a malformed request was stored"
    answered = [b for b, (s, _) in tally.valid.items() if 200 <= s < 300]
    assert [b for b in answered if counts.get(b) != 1] == [], "an event answered 2xx was not stored once"
    # the client address is haproxy's X-Forwarded-For entry, also when the client forged its own
    ips = {r["body"]: r["ip"] for r in records}
    wrong_ip = {b: (ips[b], tally.valid[b][1]) for b in ips if ips[b] != tally.valid[b][1]}
    assert wrong_ip == {}, f"recorded ip is not haproxy's X-Forwarded-For: {list(wrong_ip.values())[:5]}"
    # finding 1: no well-behaved client's POST fails because of what another client sent
    statuses: dict[int, int] = {}
    for s in failed.values():
        statuses[s] = statuses.get(s, 0) + 1
    assert failed == {}, (f"{len(failed)} of {len(good)} keep-alive POSTs of well-behaved clients failed "
                          f"behind haproxy (status: count {statuses})")

