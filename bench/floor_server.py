"""The floor of a Python server on this machine: a uvloop Protocol that answers every request with
a canned `200` and parses nothing (it counts `HTTP/1.1` request lines per segment). It shows what
the loop and the socket calls cost, apart from what estat-ingest does per request. Listens on
HTTP_ADDR (host:port); pin it as section 8 pins the servers:

    HTTP_ADDR=127.0.0.1:18080 taskset -c 0 .venv/bin/python bench/floor_server.py &
    BENCH_BODY_FILE=<a 318-byte event> taskset -c 1 wrk -t1 -c64 -d10s -s bench/wrk.lua http://127.0.0.1:18080/collect

(docs/tuning.md, "Answers once per pass", has the figures: 123k requests per CPU-second against
v1's 38.5k and estat-ingest's 23.5k before that change.)
"""

from __future__ import annotations

import asyncio
import os

import uvloop

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class Canned(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        n = data.count(b"HTTP/1.1\r\n")
        if n:
            self.transport.write(ANSWER * n)


async def main() -> None:
    host, port = os.environ["HTTP_ADDR"].rsplit(":", 1)
    await asyncio.get_running_loop().create_server(Canned, host, int(port), backlog=1024)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
