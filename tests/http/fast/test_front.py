"""The httptools front (estat_ingest/http/fast/) inside `serve()`, against the real pipeline and
file sink, over real sockets on 127.0.0.1: replies, limits, pipelining, malformed input, and every
2xx event delivered once after the drain."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson

from estat_ingest.app import serve
from estat_ingest.config import Settings
from estat_ingest.sockets import make_socket
from tests.helpers import file_objects, records_of


async def exchange(port: int, raw: bytes, expect: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Send `raw` on one connection, read `expect` responses (or until the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    out: list[tuple[int, dict[str, str], bytes]] = []
    try:
        while len(out) < expect:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if status == 100:
                continue
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            out.append((status, headers, body))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        pass
    writer.close()
    return out


def post(body: bytes, ctype: str = "application/json", extra: str = "") -> bytes:
    return (f"POST /collect HTTP/1.1\r\nHost: t\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def test_fast_front_answers_like_the_contract_and_delivers_every_accepted_event(tmp_path: Path) -> None:
    settings = Settings(http_host="127.0.0.1", http_port=0, file_sink_dir=str(tmp_path / "data"),
                        dlq_dir=str(tmp_path / "dlq"), instance_id="ff", max_body_bytes=1000,
                        shutdown_timeout_s=5.0, http_front="fast")
    accepted: list[str] = []

    async def scenario() -> int:
        sock = make_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        stop = asyncio.Event()
        server = asyncio.create_task(serve(settings, sock=sock, shutdown_trigger=stop, install_signals=False))
        for _ in range(200):
            if (await exchange(port, b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n", 1) or [(0,)])[0][0] == 200:
                break
            await asyncio.sleep(0.02)

        # two pipelined events on one keep-alive connection: two 200s, in order
        a, b = orjson.dumps({"n": 1}), orjson.dumps({"n": 2, "s": "é\u2028"})
        got = await exchange(port, post(a) + post(b), 2)
        assert [g[0] for g in got] == [200, 200]
        accepted.extend([a.decode(), b.decode()])

        nd = b'{"n":3}\n\n{"n":4}\r\n'
        assert (await exchange(port, post(nd, "application/x-ndjson"), 1))[0][0] == 200
        accepted.extend(['{"n":3}', '{"n":4}'])
        assert (await exchange(port, b"GET /collect?n=5&k=get HTTP/1.1\r\nHost: t\r\n\r\n", 1))[0][0] == 200
        accepted.append("n=5&k=get")

        exactly = b'{"p":"' + b"x" * (1000 - 8) + b'"}'
        assert len(exactly) == 1000
        assert (await exchange(port, post(exactly), 1))[0][0] == 200  # exactly MAX is allowed
        accepted.append(exactly.decode())

        status, headers, body = (await exchange(port, post(b"{" * 1001) + post(a), 2))[0]
        assert status == 413 and headers.get("connection") == "close" and b"MAX_BODY_SIZE" in body
        chunked = (b"POST /collect HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(4)) + b"0\r\n\r\n")
        assert (await exchange(port, chunked, 1))[0][0] == 413  # over the cap while streaming
        assert (await exchange(port, post(b"not json"), 1))[0][0] == 400
        assert (await exchange(port, b"PUT /collect HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 1)
                )[0][1]["allow"] == "GET, POST, OPTIONS"
        bad = await exchange(port, b"THIS IS NOT HTTP\r\n\r\n", 1)
        assert bad[0][0] == 400 and bad[0][1].get("connection") == "close"
        assert (await exchange(port, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 1))[0][0] == 404
        assert (await exchange(port, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n", 1))[0][2] == b"ok"
        metrics = (await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n", 1))[0][2]
        assert b"http_requests_accepted_total 5.0" in metrics
        assert b'http_requests_rejected_total{reason="too_large"} 2.0' in metrics
        assert b'http_requests_rejected_total{reason="bad_http"} 1.0' in metrics

        stop.set()
        return await server

    assert asyncio.run(scenario()) == 0
    bodies = sorted(r["body"] for _, r in records_of(file_objects(tmp_path / "data")))
    assert bodies == sorted(accepted)


def test_the_fast_front_does_not_import_aiohttp() -> None:
    """The fast front shares the edge policy with the aiohttp front, not the aiohttp front's module."""
    code = "import sys, estat_ingest.http.fast.front; print(sorted(m for m in sys.modules if m.startswith('aiohttp')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
