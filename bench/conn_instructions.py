"""Instructions per request through one fast-front connection (estat_ingest/http/fast/protocol.py),
counted by callgrind: a prepared request is fed N times into `HttpConn.data_received` with a stub
transport, against the real `Collector` (the queue is emptied between rounds so every answer is 200),
on a running loop: `--conns` connections get one request each per pass, and the pass ends with the
front's flush of their answers (as in the server).

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python bench/conn_instructions.py --requests 2000

prints the answer it got and callgrind prints `Collected : <instructions>`. Start-up is not a
per-request cost, so run it for two values of --requests and divide the difference by the
difference of the counts (`--compare` does that, running valgrind twice itself).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {
    # what bench/run.py's load generators send (wrk.lua, loadgen.py)
    "post": "POST /collect HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
            "User-Agent: estat-bench/1\r\nContent-Length: {n}\r\n\r\n",
    # a browser's fetch(): more headers, `Connection: keep-alive` (HTTP/1.1)
    "browser": "POST /collect HTTP/1.1\r\nHost: ingest.example.com\r\nConnection: keep-alive\r\n"
               "Content-Type: text/plain;charset=UTF-8\r\nOrigin: https://shop.example.com\r\n"
               "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36\r\n"
               "Accept: */*\r\nAccept-Language: ko-KR,ko;q=0.9\r\nReferer: https://shop.example.com/\r\n"
               "Content-Length: {n}\r\n\r\n",
}


class Transport:
    """What HttpConn uses of an asyncio transport; answers are counted, not kept."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        raise AssertionError("the connection was closed: " + self.last[:200].decode("latin-1"))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.close()

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def unbounded_collector() -> tuple[Any, Any, Any]:
    """(Collector, its queue, Metrics) at default settings, accepting and ready, over a queue no
    benchmark fills (the caller empties it now and then: the dispatcher's part is not measured)."""
    from estat_ingest.config import Settings
    from estat_ingest.http.collect import Collector
    from estat_ingest.metrics import Metrics
    from estat_ingest.pipeline.queue import EventQueue

    metrics = Metrics()
    queue: EventQueue[tuple[float, bytes]] = EventQueue(10**9)
    collector = Collector(Settings(), queue, metrics)
    collector.accepting = collector.ready = True
    return collector, queue, metrics


def run(requests: int, shape: str, size: int, conns: int) -> None:
    import asyncio

    from bodies import event_body

    from estat_ingest.http.fast.front import Front
    from estat_ingest.http.fast.protocol import HttpConn
    from estat_ingest.sockets import make_socket

    async def main() -> None:
        collector, queue, metrics = unbounded_collector()
        front = Front(collector, metrics)
        await front.start(make_socket("127.0.0.1", 0))  # the loop its connections' answers wait for
        feeds, transports = [], []
        for _ in range(conns):
            conn = HttpConn(front)
            transport = Transport()
            conn.connection_made(transport)  # type: ignore[arg-type]
            feeds.append(conn.data_received)
            transports.append(transport)
        body = event_body(1, size)
        request = SHAPES[shape].format(n=len(body)).encode() + body
        for i in range(0, requests, conns):
            for feed in feeds[:requests - i]:  # one pass of the loop: every connection had a request
                feed(request)
            await asyncio.sleep(0)  # the pass ends: Front.flush writes the answers
            if i % 1000 < conns:
                queue.snapshot()
                queue._items.clear()  # the dispatcher's part: not measured
        writes = sum(t.writes for t in transports)
        assert writes == requests, writes
        print(transports[0].last.split(b"\r\n", 1)[0].decode(), f"x{writes}", file=sys.stderr)
        await front.stop_listening()  # (Front.close would close the stub transports: not measured)

    asyncio.run(main())


def instructions(requests: int, shape: str, size: int, conns: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, __file__, "--requests", str(requests), "--shape", shape,
                          "--size", str(size), "--conns", str(conns)], env=env, capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", out.stderr)
    assert m is not None, out.stderr[-2000:]
    return int(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--shape", choices=sorted(SHAPES), default="post")
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--conns", type=int, default=1, help="connections fed one request each per pass of the loop")
    p.add_argument("--compare", type=int, nargs=2, metavar=("N1", "N2"),
                   help="run valgrind for N1 and N2 requests and print instructions per request")
    args = p.parse_args()
    if args.compare:
        n1, n2 = args.compare
        a, b = (instructions(n, args.shape, args.size, args.conns) for n in (n1, n2))
        print(f"{args.shape} {args.size} B: {(b - a) / (n2 - n1):.0f} instructions per request "
              f"({n1}: {a}, {n2}: {b})")
    else:
        run(args.requests, args.shape, args.size, args.conns)


if __name__ == "__main__":
    main()
