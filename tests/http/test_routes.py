"""The aiohttp front in-process, inside `serve()`: body cap before reading, /health, /ready, /metrics format."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from estat_ingest.app import serve
from estat_ingest.config import Settings
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.memory import MemorySink
from estat_ingest.sockets import make_socket

V1_METRICS = [
    "http_requests_total", "http_requests_accepted_total", "http_requests_rejected_body_too_large_total",
    "http_requests_rejected_queue_full_total", "s3_events_stored_total", "s3_put_errors_total",
    "dlq_events_enqueued_total", "dlq_events_reuploaded_total", "dlq_events_dropped_total",
    "dlq_files_expired_total", "dlq_files_current", "dlq_size_bytes",
]


def run(tmp_path: Path, body: Callable[[aiohttp.ClientSession, int], Awaitable[None]], **kw: Any) -> None:
    """`body` against `serve()` itself (the aiohttp front), the path production runs."""

    async def main() -> None:
        s = Settings.from_env({}, dlq_dir=str(tmp_path / "dlq"), instance_id="t", http_front="aiohttp", **kw)
        sock = make_socket("127.0.0.1", 0, listen=False)
        port = sock.getsockname()[1]
        stop = asyncio.Event()
        server = asyncio.create_task(serve(s, sock=sock, shutdown_trigger=stop, install_signals=False,
                                           metrics=Metrics(), sinks=[MemorySink()]))
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
                for _ in range(500):  # nothing answers before start-up is complete, then /ready is 200
                    try:
                        async with client.get("/ready") as r:
                            assert r.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        assert not server.done(), server
                        await asyncio.sleep(0.02)
                await body(client, port)
        finally:
            stop.set()
            assert await server == 0

    asyncio.run(main())





def test_health_ready_and_metrics(tmp_path: Path) -> None:
    async def body(client: aiohttp.ClientSession, port: int) -> None:
        r = await client.get("/health")
        assert r.status == 200 and await r.text() == "ok"
        assert (await client.get("/ready")).status == 200
        await client.post("/collect", data=b'{"a":1}')
        await client.post("/collect", data=b"x" * 20000)
        r = await client.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
        for name in V1_METRICS:
            assert name in text, name
        assert samples["http_requests_accepted_total"] == 1
        assert samples["http_requests_rejected_body_too_large_total"] == 1
        assert samples["ingest_ready"] == 1 and samples["ingest_queue_capacity_events"] == 4000
        for name in ("ingest_queue_depth_events", "batch_events", "batch_bytes", "upload_duration_seconds",
                     "events_delivered"):
            assert name in families, name

    run(tmp_path, body)


def test_413_on_content_length_before_reading_the_body(tmp_path: Path) -> None:
    async def body(client: aiohttp.ClientSession, port: int) -> None:
        def raw() -> bytes:
            # announce MAX+1 bytes but send none: the answer must come without waiting for them
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 16385\r\n\r\n")
                return s.recv(4096)

        answer = await asyncio.to_thread(raw)
        assert answer.startswith(b"HTTP/1.1 413")
        exact = b'"' + b"x" * 16382 + b'"'
        assert len(exact) == 16384
        assert (await client.post("/collect", data=exact)).status == 200
        assert (await client.post("/collect", data=exact + b" ")).status == 413

        async def chunked() -> Any:  # no Content-Length: the cap applies while reading
            yield b'"' + b"x" * 10000
            yield b"x" * 10000 + b'"'

        assert (await client.post("/collect", data=chunked())).status == 413

    run(tmp_path, body)


def test_get_and_ndjson_through_http(tmp_path: Path) -> None:
    async def body(client: aiohttp.ClientSession, port: int) -> None:
        assert (await client.get("/collect?e=1&b=%20")).status == 200
        r = await client.post("/collect", data=b'{"a":1}\n{"a":2}\n',
                              headers={"Content-Type": "application/x-ndjson"})
        assert r.status == 200
        r = await client.request("PUT", "/collect", data=b"{}")
        assert r.status == 405 and r.headers["Allow"] == "GET, POST, OPTIONS"
        assert (await client.get("/nope")).status == 404

    run(tmp_path, body)
