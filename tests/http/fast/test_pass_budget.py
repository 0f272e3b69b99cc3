"""The fast front reads at most PASS_BYTES per pass of the loop over the ready sockets: data that
comes after the pass's budget is spent waits for the next pass, its connection's reading paused,
and is then read in arrival order. Nothing is lost, reordered or answered twice; single-event
traffic never meets the budget.

Why (docs/tuning.md, "Overload"): at 64 connections of 32 KB NDJSON bodies a pass that read every
body took ≈ 15 ms, and the uploaders that free the queue's room get one turn per pass."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from estat_ingest.http.fast.front import Front
from estat_ingest.http.fast.protocol import HttpConn
from estat_ingest.http.policy import PASS_BYTES
from estat_ingest.sockets import make_socket
from tests.http.util import make

ND = b"application/x-ndjson"


def ndjson_post(conn: int, req: int, events: int, pad: int = 280) -> bytes:
    body = b"".join(orjson.dumps({"c": conn, "r": req, "i": i, "pad": "x" * pad}) + b"\n" for i in range(events))
    return (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: " + ND + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def stored(q: Any) -> list[tuple[int, int, int]]:
    """(connection, request, index) of every queued event, in queue order."""
    out = []
    for _, line in q.snapshot():
        e = orjson.loads(orjson.loads(line)["body"])
        out.append((e["c"], e["r"], e["i"]))
    return out


class Transport:
    """What HttpConn calls on its transport, with the reading state uvloop keeps."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.written = b""
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:  # (Front.close aborts what is still open)
        self.calls.append("abort")

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.calls.append("pause")

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True
        self.calls.append("resume")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


async def started(**settings: Any) -> tuple[Front, Any]:
    c, q, m = make(channel_size=100_000, max_body_bytes=1 << 20, **settings)
    c.accepting = c.ready = True
    front = Front(c, m)
    await front.start(make_socket("127.0.0.1", 0))
    return front, q


def test_data_over_the_pass_budget_waits_for_the_next_pass_then_is_read_in_order() -> None:
    async def run() -> None:
        front, q = await started()
        try:
            big = ndjson_post(0, 0, PASS_BYTES // 300 + 10)  # more than the budget alone: read all the same
            assert len(big) > PASS_BYTES
            a, b, c = HttpConn(front), HttpConn(front), HttpConn(front)
            ta, tb, tc = Transport(), Transport(), Transport()
            for conn, t in ((a, ta), (b, tb), (c, tc)):
                conn.connection_made(t)  # type: ignore[arg-type]
            a.data_received(big)  # the first read of a pass always has the budget
            n_big = len(stored(q))
            assert n_big == PASS_BYTES // 300 + 10
            b.data_received(ndjson_post(1, 0, 3))  # the budget is spent: waits, reading paused
            c.data_received(ndjson_post(2, 0, 2))
            assert len(stored(q)) == n_big and (tb.calls, tc.calls) == (["pause"], ["pause"])
            assert front.deferred_reads == 2 and b.stash is not None
            await asyncio.sleep(0)  # the next pass: b, then c, then reading goes on
            assert stored(q)[n_big:] == [(1, 0, 0), (1, 0, 1), (1, 0, 2), (2, 0, 0), (2, 0, 1)]
            assert (tb.calls, tc.calls) == (["pause", "resume"], ["pause", "resume"])
            await asyncio.sleep(0)  # the answers of that pass go out at its end
            assert [t.written.count(b"HTTP/1.1 200 OK") for t in (ta, tb, tc)] == [1, 1, 1]
            assert b.stash is None and c.stash is None and not front.deferred
        finally:
            await front.stop_listening()
            await front.close()

    asyncio.run(run())


def test_a_connection_lost_while_its_data_waits_is_skipped() -> None:
    async def run() -> None:
        front, q = await started()
        try:
            a, b = HttpConn(front), HttpConn(front)
            ta, tb = Transport(), Transport()
            a.connection_made(ta)  # type: ignore[arg-type]
            b.connection_made(tb)  # type: ignore[arg-type]
            a.data_received(ndjson_post(0, 0, PASS_BYTES // 300 + 10))
            before = len(stored(q))
            b.data_received(ndjson_post(1, 0, 3))
            b.connection_lost(None)
            await asyncio.sleep(0)
            assert len(stored(q)) == before and tb.written == b"" and not front.deferred
        finally:
            await front.stop_listening()
            await front.close()

    asyncio.run(run())


def test_many_connections_of_large_pipelined_bodies_lose_and_reorder_nothing() -> None:
    """Real sockets on a real loop: 12 connections each send 3 pipelined NDJSON requests of ≈ 60 KB
    at once (≈ 2 MB, several passes' budget); every request is answered 200 once and every event
    is queued once, each connection's in the order it sent them."""
    conns, reqs, events = 12, 3, 200

    async def run() -> tuple[list[tuple[int, int, int]], list[list[int]], int]:
        front, q = await started()
        assert front.server is not None
        port = front.server.sockets[0].getsockname()[1]
        try:
            pairs = [await asyncio.open_connection("127.0.0.1", port) for _ in range(conns)]
            for c, (_, w) in enumerate(pairs):
                w.write(b"".join(ndjson_post(c, r, events) for r in range(reqs)))
            await asyncio.gather(*(w.drain() for _, w in pairs))
            statuses = []
            for r, w in pairs:
                got = []
                for _ in range(reqs):
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
                    got.append(int(head.split(b" ", 2)[1]))
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    await asyncio.wait_for(r.readexactly(length), 20)
                statuses.append(got)
                w.close()
            return stored(q), statuses, front.deferred_reads
        finally:
            await front.stop_listening()
            await front.close()

    events_seen, statuses, deferred = asyncio.run(run())
    assert statuses == [[200] * reqs] * conns
    assert deferred > 0, "the test never went over a pass's budget"
    assert sorted(events_seen) == [(c, r, i) for c in range(conns) for r in range(reqs) for i in range(events)]
    for c in range(conns):  # per connection, the order it sent
        mine = [e for e in events_seen if e[0] == c]
        assert mine == sorted(mine)
