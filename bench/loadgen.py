"""A lean HTTP/1.1 keep-alive load generator (asyncio Protocol + uvloop), for two jobs:

- the fallback when `wrk` is not installed (closed loop: each connection sends its next request as
  soon as the previous answer arrived, like `wrk -c`);
- constant offered load (open loop, wrk2-style): request i is due at start + i/rate; latency is
  measured from when it was DUE, not when a connection was free, so queueing delay is counted
  (no coordinated omission). If the generator cannot keep up, the achieved rate says so.

Prints one JSON line: requests, ok (2xx), non2xx, errors, duration_s, rps, ok_rps, p50/p99/p999/max
latency in ms, and the generator's own CPU seconds (user + system).

    python bench/loadgen.py --url http://127.0.0.1:8080/collect --body-file b.json -c 64 -d 10
    python bench/loadgen.py ... --rate 15000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import time
from array import array
from urllib.parse import urlsplit


class Stats:
    def __init__(self) -> None:
        self.lat = array("d")
        self.ok = 0
        self.non2xx = 0
        self.errors = 0
        self.recording = False


class Conn(asyncio.Protocol):
    def __init__(self, gen: Gen) -> None:
        self.gen = gen
        self.buf = bytearray()
        self.need: int | None = None  # bytes of the current response still expected in total
        self.status = 0
        self.t_due = 0.0
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gen.idle(self)

    def send(self, t_due: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.t_due = t_due
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                self.status = int(head[9:12])
                length = 0
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    length = int(head[i + 17: j if j >= 0 else len(head)])
                self.need = end + 4 + length
            if len(buf) < self.need:
                return
            del buf[: self.need]
            self.need = None
            self.busy = False
            self.gen.done(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.gen.stats.errors += 1
        self.busy = False
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        self.gen.lost(self)


class Gen:
    def __init__(self, args: argparse.Namespace) -> None:
        u = urlsplit(args.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        body = open(args.body_file, "rb").read() if args.body_file else b""  # noqa: SIM115
        method = args.method or ("POST" if body else "GET")
        extra = [h.strip() for h in args.header]
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}", f"Content-Type: {args.content_type}"]
        if not any(h.lower().startswith("user-agent:") for h in extra):
            head.append("User-Agent: estat-bench/1")
        head += extra
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.rate = args.rate
        self.stats = Stats()
        self.free: collections.deque[Conn] = collections.deque()
        self.backlog: collections.deque[float] = collections.deque()  # due times (open loop)
        self.running = True
        self.conns: list[Conn] = []

    def now(self) -> float:
        return time.perf_counter()

    def idle(self, conn: Conn) -> None:
        if not self.running or conn.transport is None:
            return
        if self.rate is None:
            conn.send(self.now())
        elif self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.free.append(conn)

    def done(self, conn: Conn, status: int) -> None:
        s = self.stats
        if s.recording:
            s.lat.append(self.now() - conn.t_due)
            if 200 <= status < 300:
                s.ok += 1
            else:
                s.non2xx += 1
        self.idle(conn)

    def lost(self, conn: Conn) -> None:
        if self.running:
            asyncio.get_running_loop().create_task(self.reconnect(conn))

    async def reconnect(self, old: Conn) -> None:
        if old in self.conns:
            self.conns.remove(old)
        try:
            await self.connect()
        except OSError:
            self.stats.errors += 1
            await asyncio.sleep(0.01)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
        self.conns.append(conn)

    async def pace(self, until: float) -> None:
        """Open loop: release due requests every millisecond until `until`."""
        assert self.rate is not None
        start = self.now()
        sent = 0
        while True:
            now = self.now()
            if now >= until:
                return
            due_n = int((now - start) * self.rate)
            while sent < due_n:
                t = start + sent / self.rate
                sent += 1
                while self.free and self.free[0].transport is None:
                    self.free.popleft()
                if self.free:
                    self.free.popleft().send(t)
                else:
                    self.backlog.append(t)
            await asyncio.sleep(0.001)


def pct(sorted_lat: list[float], p: float) -> float:
    if not sorted_lat:
        return float("nan")
    k = min(len(sorted_lat) - 1, max(0, round(p / 100.0 * len(sorted_lat)) - 1))
    return sorted_lat[k] * 1000.0


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    gen = Gen(args)
    await asyncio.gather(*(gen.connect() for _ in range(args.connections)))
    if args.warmup > 0 and gen.rate is None:
        await asyncio.sleep(args.warmup)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = gen.now()
    gen.stats.recording = True
    if gen.rate is None:
        await asyncio.sleep(args.duration)
    else:
        await gen.pace(t0 + args.duration)
    gen.stats.recording = False
    t1 = gen.now()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    gen.running = False
    unsent = len(gen.backlog)
    for c in list(gen.conns):
        if c.transport is not None:
            c.transport.close()
    s = gen.stats
    lat = sorted(s.lat)
    dur = t1 - t0
    n = len(lat)
    return {
        "tool": "loadgen.py", "mode": "closed" if gen.rate is None else "open",
        "target_rate": gen.rate, "connections": args.connections,
        "requests": n, "ok": s.ok, "non2xx": s.non2xx, "errors": s.errors, "unsent_at_end": unsent,
        "duration_s": dur, "rps": n / dur, "ok_rps": s.ok / dur,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "p999_ms": pct(lat, 99.9),
        "max_ms": lat[-1] * 1000.0 if lat else float("nan"),
        "gen_cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--body-file")
    p.add_argument("--method")
    p.add_argument("--content-type", default="application/json")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header, repeatable (a User-Agent here replaces estat-bench/1)")
    p.add_argument("-c", "--connections", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    args = p.parse_args()
    try:
        import uvloop

        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    sys.stdout.write("BENCHJSON " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
