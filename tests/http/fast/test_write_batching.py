"""The fast front hands a connection's answers to its transport once per pass of the loop
(`HttpConn.write` queues, `Front.flush` writes), so the answers of every client that was ready go
out back to back. What must hold: nothing is lost or reordered, one transport write per connection
per pass, and an answer is always handed over before the connection is closed or half-closed.

A started `Front` on a real listening socket and a real running loop; the connection's transport
records the calls made on it (the order of write, write_eof and close is what is checked)."""

from __future__ import annotations

import asyncio
from typing import Any

from estat_ingest.http.fast.front import Front
from estat_ingest.http.fast.protocol import HttpConn
from estat_ingest.sockets import make_socket
from tests.http.util import make


class Recorder:
    """The transport methods HttpConn calls, recorded in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", b""))

    def abort(self) -> None:
        self.calls.append(("abort", b""))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append(("write_eof", b""))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def statuses(self) -> list[str]:
        """The status lines in what was written, in order, and the other calls by name."""
        out: list[str] = []
        for name, data in self.calls:
            if name == "write":
                out.extend(part.split(b"\r\n", 1)[0].decode() for part in data.split(b"HTTP/1.1 ")[1:])
            else:
                out.append(name)
        return out


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def started() -> tuple[Front, Any]:
    c, q, m = make()
    c.accepting = c.ready = True
    front = Front(c, m)
    await front.start(make_socket("127.0.0.1", 0))
    return front, q


async def conn_of(front: Front) -> tuple[HttpConn, Recorder]:
    conn = HttpConn(front)
    rec = Recorder()
    conn.connection_made(rec)  # type: ignore[arg-type]
    return conn, rec


def test_answers_of_one_pass_are_one_write_in_request_order() -> None:
    async def run() -> tuple[list[tuple[str, bytes]], list[str], list[str], int]:
        front, q = await started()
        try:
            a, ra = await conn_of(front)
            b, rb = await conn_of(front)
            # pipelined: 200, 404, 400 (bad JSON), 200 for /health, 200; and a second client
            a.data_received(post(b'{"n":1}') + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + post(b"{bad")
                            + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + post(b'{"n":2}'))
            b.data_received(post(b'{"n":3}'))
            before = list(ra.calls) + list(rb.calls)  # still queued: the pass is not over
            await asyncio.sleep(0)
            return before, ra.statuses(), rb.statuses(), len(ra.calls) + len(rb.calls) + len(q._items)
        finally:
            await front.stop_listening()
            await front.close()

    before, a, b, total = asyncio.run(run())
    assert before == []
    assert a == ["200 OK", "404 Not Found", "400 Bad Request", "200 OK", "200 OK"]
    assert b == ["200 OK"]
    assert total == 1 + 1 + 3  # one write per connection; the three events were queued


def test_queued_answers_go_out_before_a_close_or_a_half_close() -> None:
    async def run() -> tuple[list[str], list[str], list[str]]:
        front, _ = await started()
        try:
            # `Connection: close`: the answers, then the close, in the same pass
            a, ra = await conn_of(front)
            a.data_received(post(b'{"n":1}') + post(b'{"n":2}', b"Connection: close\r\n") + post(b'{"n":3}'))
            # a refusal after an accepted request: both answers, then the half-close (linger)
            b, rb = await conn_of(front)
            b.data_received(post(b'{"n":4}') + b"GET /x HTTP/1.1\r\nHost: x\r\nX-Bad: \x01\r\n\r\n")
            # the client's EOF after a request: its answer is handed over before the transport closes
            c, rc = await conn_of(front)
            c.data_received(post(b'{"n":5}'))
            assert c.eof_received() is None
            return ra.statuses(), rb.statuses(), rc.statuses()
        finally:
            await front.stop_listening()
            await front.close()

    a, b, c = asyncio.run(run())
    assert a == ["200 OK", "200 OK", "close"]  # the third request is never read
    assert b == ["200 OK", "400 Bad Request", "write_eof"]
    assert c == ["200 OK"]  # eof_received returned None: the transport closes itself after it
