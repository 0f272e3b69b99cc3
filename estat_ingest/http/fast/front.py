"""The fast front's listening side (`Front`): the state every connection shares, the sweeper that
checks every connection's deadlines once per interval, and start / stop_listening / close."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque

from estat_ingest.http.collect import OK_REPLY, Collector
from estat_ingest.http.fast.protocol import HttpConn
from estat_ingest.http.fast.render import DateHeader, render
from estat_ingest.http.policy import PASS_BYTES, ProtocolErrors
from estat_ingest.metrics import Metrics
from estat_ingest.sockets import BACKLOG


class Front:
    """The listening side: shared state of every connection, the sweeper, start/stop."""

    def __init__(self, collector: Collector, metrics: Metrics) -> None:
        self.collector = collector
        self.metrics = metrics
        self.limits = limits = collector.limits  # the edge policy (http/policy.py)
        self.protocol_errors = ProtocolErrors(metrics)
        self.date = DateHeader()
        self.conns: set[HttpConn] = set()
        self.server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start(), before any connection
        self._sweeper: asyncio.Task[None] | None = None
        self._all_closed: asyncio.Event | None = None  # set by the last connection_lost while closing
        self._unflushed: list[HttpConn] = []  # connections with answers queued (HttpConn.write)
        # the read budget of the loop's pass over the ready sockets (PASS_BYTES): bytes read in this
        # pass, the connections whose data waits for the next pass (in arrival order), and how many
        # reads waited so (for tests and the curious)
        self.pass_bytes = 0
        self.pass_reset = False  # `next_pass` is scheduled
        self.deferred: deque[HttpConn] = deque()
        self.deferred_reads = 0
        self._ok_cache: tuple[bytes, bytes, bytes, bytes] = (b"", b"", b"", b"")  # date, kept, close, announced
        # read once per request (per header line): one attribute away
        self.max_url = limits.request_line_bytes
        self.header_line_bytes, self.max_headers = limits.header_line_bytes, limits.headers
        # Bounds on a header section still arriving (httptools keeps a header until it is
        # complete): the line in progress, and the whole section. The estimate may include the
        # tail of the previous pipelined request (at most one body), hence + body_bytes.
        self.line_cap = max(self.max_url, limits.header_line_bytes) + limits.body_bytes + 64
        self.head_cap = self.max_url + limits.headers * (limits.header_line_bytes + 4) + limits.body_bytes + 4096
        self.sweep_s = max(0.05, min(1.0, limits.header_read_s / 4, limits.body_read_s / 4))

    def ok_bytes(self, close: bool, keep_alive: bool = False) -> bytes:
        """The 200 reply (`render`'s `close` and `keep_alive`), re-rendered only when the Date second
        changes."""
        date = self.date.get()
        cache = self._ok_cache
        if cache[0] is not date:
            cache = self._ok_cache = (date, render(200, OK_REPLY.headers, b"", date, False),
                                      render(200, OK_REPLY.headers, b"", date, True),
                                      render(200, OK_REPLY.headers, b"", date, False, keep_alive=True))
        return cache[2] if close else cache[3] if keep_alive else cache[1]

    def defer(self, conn: HttpConn) -> None:
        """`conn` has answers queued: `flush` once the loop has run what is ready now (the
        callbacks of this pass over the ready sockets run before the loop's ready queue)."""
        if not self._unflushed:
            assert self.loop is not None, "connections exist only after Front.start()"
            self.loop.call_soon(self.flush)
        self._unflushed.append(conn)

    def spend(self, n: int) -> bool:
        """`n` bytes just read: True when this pass still has budget for them (PASS_BYTES; the
        first read of a pass always has), else the caller defers them to the next pass."""
        if self.pass_bytes >= PASS_BYTES:
            return False
        if not self.pass_reset:
            self.pass_reset = True
            assert self.loop is not None, "connections exist only after Front.start()"
            self.loop.call_soon(self.next_pass)
        self.pass_bytes += n
        return True

    def next_pass(self) -> None:
        """A new pass: the budget again, first for the reads that waited, in arrival order."""
        self.pass_reset = False
        self.pass_bytes = 0
        deferred = self.deferred
        while deferred and self.pass_bytes < PASS_BYTES:
            deferred.popleft().read_deferred()
        if deferred and not self.pass_reset:  # (a read of this pass scheduled it already otherwise)
            self.pass_reset = True
            assert self.loop is not None
            self.loop.call_soon(self.next_pass)

    def flush(self) -> None:
        """Hand every connection's queued answers to its transport."""
        conns, self._unflushed = self._unflushed, []
        for conn in conns:
            conn.flush()

    async def start(self, sock: socket.socket) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: HttpConn(self), sock=sock, backlog=BACKLOG)
        self._sweeper = asyncio.create_task(self._sweep(), name="fastfront-sweep")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            now = time.monotonic()  # the connections' clock (uvloop's loop.time() has another origin)
            for conn in list(self.conns):
                conn.tick(now)

    async def stop_listening(self) -> None:
        """New connections are refused; open ones are still served (answers carry `Connection:
        close` once the collector is not ready)."""
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        """Close every connection (a request still incomplete gets no answer), stop the sweeper."""
        for conn in list(self.conns):
            conn.closing = True
            conn.close()  # written answers are flushed first
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.conns:  # a client that does not read its last answer holds its transport: bounded
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.limits.close_flush_s)
        for conn in list(self.conns):
            conn.abort()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), self.limits.close_flush_s)
