"""/metrics of a `serve --workers N` worker, on both fronts inside `serve()`: the answer comes from
`metrics.group` (the parent's merge) without blocking the loop — other requests, pipelined behind
it or on other connections, are answered meanwhile and in order — a parent that does not answer is
a 503 (a failed scrape, not one worker's figures), and with METRICS_ADDR the public port says 404."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from estat_ingest.app import serve
from estat_ingest.config import Settings
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.memory import MemorySink
from estat_ingest.sockets import make_socket
from tests.http.fast.test_front import exchange

GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


async def started(settings: Settings, metrics: Metrics) -> tuple[int, asyncio.Event, asyncio.Task[int]]:
    sock = make_socket("127.0.0.1", 0, listen=False)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, sock=sock, shutdown_trigger=stop, install_signals=False,
                                       metrics=metrics, sinks=[MemorySink()]))
    for _ in range(500):  # nothing listens before start-up is complete, then /ready is 200
        with contextlib.suppress(OSError):
            if [s for s, _, _ in await exchange(port, b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n", 1)] == [200]:
                break
        assert not server.done()
        await asyncio.sleep(0.02)
    return port, stop, server


def settings_for(tmp_path: Path, front: str, **kw: object) -> Settings:
    return Settings.from_env({}, dlq_dir=str(tmp_path / "dlq"), instance_id="t", http_front=front, **kw)


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
def test_the_group_answer_is_awaited_without_holding_up_anything(tmp_path: Path, front: str) -> None:
    async def main() -> None:
        metrics = Metrics()
        release = asyncio.Event()
        asked = 0

        async def group() -> bytes:
            nonlocal asked
            asked += 1
            await release.wait()
            return b"# the group's merge\ngroup_metric 1.0\n"

        metrics.group = group
        port, stop, server = await started(settings_for(tmp_path, front), metrics)
        try:
            scrape = asyncio.create_task(exchange(port, GET_METRICS + GET_HEALTH, 2))
            while asked == 0:
                await asyncio.sleep(0.01)
            # the loop serves others while the scrape waits for the parent
            assert (await exchange(port, GET_HEALTH, 1))[0][2] == b"ok"
            assert not scrape.done()
            release.set()
            got = await scrape
            assert [(s, b) for s, _, b in got] == [(200, b"# the group's merge\ngroup_metric 1.0\n"), (200, b"ok")]
            assert got[0][1]["content-type"].startswith("text/plain; version=0.0.4")
            # a client that leaves while its scrape waits leaves nothing behind
            release.clear()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET_METRICS)
            await writer.drain()
            while asked < 2:
                await asyncio.sleep(0.01)
            writer.close()
            await asyncio.sleep(0.05)
            release.set()
            assert (await exchange(port, GET_HEALTH, 1))[0][2] == b"ok"
        finally:
            stop.set()
            assert await server == 0

    asyncio.run(main())


@pytest.mark.parametrize("front", ["fast", "aiohttp"])
def test_a_parent_that_does_not_answer_is_a_failed_scrape(tmp_path: Path, front: str) -> None:
    async def main() -> None:
        metrics = Metrics()

        async def gone() -> bytes:
            raise ConnectionRefusedError(111, "Connection refused")

        metrics.group = gone
        port, stop, server = await started(settings_for(tmp_path, front), metrics)
        try:
            got = await exchange(port, GET_METRICS + GET_HEALTH, 2)
            assert [s for s, _, _ in got] == [503, 200]
            assert b"supervisor did not answer" in got[0][2]
        finally:
            stop.set()
            assert await server == 0

    asyncio.run(main())
