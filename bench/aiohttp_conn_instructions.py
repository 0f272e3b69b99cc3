"""Instructions per POST /collect through one aiohttp-front connection (http/aiohttp_conn.py's
handler and parser, routes.py, the real Collector), in process with a stub transport, for callgrind:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python bench/aiohttp_conn_instructions.py 1000     # and 3000

(the difference of the two counts / 2000 = instructions per request). A tree without
http/aiohttp_conn.py (before issue 15) is measured with aiohttp's own AppRunner: put it first on
PYTHONPATH. The fast front's counterpart: bench/conn_instructions.py.
"""

from __future__ import annotations

import asyncio
import sys


class Transport(asyncio.Transport):
    """What aiohttp's connection uses of a transport; answers are kept to check the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.buf = bytearray()
        self.closed = False
        self.written = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        self.buf += data
        self.written.set()

    def writelines(self, parts: object) -> None:
        for p in parts:  # type: ignore[attr-defined]
            self.write(p)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

async def main(n: int) -> None:
    from aiohttp import web
    from conn_instructions import unbounded_collector

    from estat_ingest.http.aiohttp_front import server_kwargs
    from estat_ingest.http.routes import build_app
    c, q, m = unbounded_collector()
    app = build_app(c, m)
    runner: web.AppRunner
    try:
        from estat_ingest.http.aiohttp_conn import FramingRunner

        runner = FramingRunner(app, c, handle_signals=False, access_log=None, **server_kwargs(app))
    except ImportError:  # before issue 15
        runner = web.AppRunner(app, handle_signals=False, access_log=None, **server_kwargs(app))
    await runner.setup()
    assert runner.server is not None
    proto = runner.server()
    t = Transport()
    proto.connection_made(t)
    body = b'{"event":"page_view","url":"https://shop.example.com/cart","pad":"' + b"x" * 240 + b'"}'
    req = (b"POST /collect HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
           b"User-Agent: estat-bench/1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    for i in range(n):
        t.written.clear()
        proto.data_received(req)
        await t.written.wait()
        if i % 1000 == 999:
            q._items.clear()  # the dispatcher's part: not measured
    await asyncio.sleep(0)
    assert b"HTTP/1.1 200" in bytes(t.buf[:40]), bytes(t.buf[:200])
    print("ok", n, t.writes, file=sys.stderr)

if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
