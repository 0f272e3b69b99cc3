"""The fast front after a 503 for want of room: the connection stays open, its next request is read
(FULL_HOLD_S later) and answered, and every event answered 200 reaches the sink once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from estat_ingest.app import serve
from estat_ingest.config import Settings
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.memory import MemorySink
from estat_ingest.sockets import make_socket


def request(n: int) -> bytes:
    body = orjson.dumps({"n": n})
    return (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    await asyncio.wait_for(reader.readexactly(length), 10)
    return status, head


def test_a_connection_refused_for_room_is_served_again_and_loses_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        s = Settings.from_env({}, dlq_dir=str(tmp_path / "dlq"), instance_id="t", http_front="fast",
                              channel_size=4, batch_max_events=2, upload_queue_batches=1, upload_concurrency=1)
        sink = MemorySink(gated=True)  # stuck until the gate opens: the queue fills
        sock = make_socket("127.0.0.1", 0, listen=False)
        port = sock.getsockname()[1]
        stop = asyncio.Event()
        server = asyncio.create_task(serve(s, sock=sock, shutdown_trigger=stop, install_signals=False,
                                           metrics=Metrics(), sinks=[sink]))
        try:
            for _ in range(500):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    assert not server.done(), server
                    await asyncio.sleep(0.02)
            ok: list[int] = []
            n = 0
            refused_head = b""
            while not refused_head:  # one connection, one request at a time, until a 503
                writer.write(request(n))
                status, head = await answer(reader)
                assert status in (200, 503), head
                if status == 200:
                    ok.append(n)
                else:
                    refused_head = head
                n += 1
                assert n < 1000, "the queue never filled"
            assert b"connection: close" not in refused_head.lower()  # a 503 for room keeps the connection
            # the next requests on that connection are read and answered; once the sink takes
            # batches again they are accepted
            assert sink.gate is not None
            sink.gate.set()
            for _ in range(200):
                writer.write(request(n))
                status, head = await answer(reader)
                assert status in (200, 503), head
                if status == 200:
                    ok.append(n)
                n += 1
                if len(ok) >= 12:
                    break
            assert len(ok) >= 12, f"only {len(ok)} accepted after the sink came back"
            writer.close()
        finally:
            stop.set()
            assert await server == 0
        stored = [orjson.loads(orjson.loads(line)["body"])["n"] for line in sink.lines()]
        assert sorted(stored) == ok  # every 2xx event once, no refused one

    asyncio.run(main())
