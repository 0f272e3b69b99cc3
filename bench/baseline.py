"""The same-run yardstick: bare aiohttp + uvloop, the handler reads the body and answers 200.

Same runner options as `estat-ingest serve` (no access log, keep-alive), nothing else: the ratio
full-pipeline / this is what the aiohttp front leaves for our own work.

    python bench/baseline.py 127.0.0.1 8081
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web


async def collect(request: web.Request) -> web.Response:
    await request.read()
    return web.Response()


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def main(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/collect", collect)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=75.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1], int(sys.argv[2])))
