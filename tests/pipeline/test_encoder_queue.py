"""Encoder round trips and full-stream verification; the closable queue."""

from __future__ import annotations

import asyncio

import pytest

from estat_ingest.formats.codec import CorruptPayload, compress, decompress, verify
from estat_ingest.pipeline.queue import EventQueue

LINES = b"".join(b'{"n":%d}\n' % i for i in range(5000))


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_round_trip_and_verify(codec: str) -> None:
    data = compress(LINES, codec, 1 if codec == "gzip" else 3)
    assert decompress(data, codec) == LINES
    assert verify(data, codec) == 5000


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_torn_or_flipped_stream_is_detected(codec: str) -> None:
    data = compress(LINES, codec, 1 if codec == "gzip" else 3)
    for bad in (data[: len(data) // 2], data[:-4], data[:-1]):
        with pytest.raises(CorruptPayload):
            verify(bad, codec)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(CorruptPayload):
        verify(bytes(flipped), codec)


def test_first_line_valid_but_rest_torn_is_corrupt() -> None:
    """v1 checked only the first line, so a torn file whose first line survived was uploaded."""
    data = compress(LINES, "gzip", 1)
    torn = data[: len(data) - 100]
    with pytest.raises(CorruptPayload):
        verify(torn, "gzip")


def test_invalid_json_line_is_corrupt() -> None:
    with pytest.raises(CorruptPayload):
        verify(compress(b'{"a":1}\nnot json\n', "gzip", 1), "gzip")


def test_queue_offer_many_is_all_or_nothing_and_close_drains() -> None:
    async def run() -> None:
        q: EventQueue[int] = EventQueue(5)
        assert q.offer_many([1, 2, 3])
        assert not q.offer_many([4, 5, 6])  # would exceed: nothing taken
        assert len(q) == 3 and q.room() == 2
        assert q.offer(4)
        assert await q.take(10, None) == [1, 2, 3, 4]
        assert await q.take(10, 0.01) == []
        q.offer(5)
        q.close()
        assert not q.offer(6)
        assert await q.take(10, None) == [5]
        assert await q.take(10, None) is None

    asyncio.run(run())


def test_queue_take_all_the_timer_and_a_wake_while_waiting() -> None:
    async def run() -> None:
        q: EventQueue[int] = EventQueue(10_000)
        assert q.offer_many(list(range(3000)))
        assert await q.take(None, None) == list(range(3000))  # everything at once (the dispatcher's take)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await q.take(None, 0.05) == []  # the timer ends the wait
        assert loop.time() - t0 >= 0.04
        waiter = asyncio.ensure_future(q.take(None, 30))
        await asyncio.sleep(0)
        assert q.offer(7)  # wakes the waiting consumer at once, not after its timer
        assert await asyncio.wait_for(waiter, 1) == [7]
        assert not [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]  # its timer was cancelled

    asyncio.run(run())


def test_queue_offer_charges_the_given_size_or_computes_it() -> None:
    q: EventQueue[tuple[float, bytes]] = EventQueue(10, 1 << 20, lambda item: len(item[1]), weight=2)
    assert q.offer((0.0, b"abc"))
    assert q.offer((0.0, b"abcde"), 5)
    assert q.offer_many([(0.0, b"x"), (0.0, b"yy")])
    assert q.held_bytes == 2 * (3 + 5 + 1 + 2)


def test_tickets_of_requests_not_taken_yet_are_one_future() -> None:
    async def run() -> None:
        q: EventQueue[int] = EventQueue(100)
        q.offer(1)
        a = q.ticket()
        q.offer_many([2, 3])
        b = q.ticket()
        assert a is b  # one future covers both requests: nothing of them was taken yet
        assert await q.take(1, None) == [1, 2, 3]  # and a take never splits it
        assert q.take_tickets() == [a]
        q.offer(4)
        c = q.ticket()
        assert c is not a
        assert await q.take(None, None) == [4]
        q.offer(5)
        d = q.ticket()  # the previous one is taken: a new future, handed out after it
        assert d is not c
        assert q.take_tickets() == [c]

    asyncio.run(run())


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
@pytest.mark.parametrize("release", [False, True])
def test_encode_lines_is_one_stream_equal_to_the_joined_lines(codec: str, release: bool) -> None:
    import zstandard

    from estat_ingest.formats.codec import encode_lines

    lines = [b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * (i % 3000)) for i in range(3000)]  # ~4.5 MB: many chunks
    joined = b"".join(lines)
    data = encode_lines(lines, len(joined), codec, 1 if codec == "gzip" else 3, release=release)
    assert decompress(data, codec) == joined
    assert verify(data, codec) == 3000
    assert (lines == []) is release  # released lines are gone, kept lines untouched
    if codec == "zstd":
        assert zstandard.get_frame_parameters(data).content_size == len(joined)
    else:
        import zlib

        d = zlib.decompressobj(31)
        assert d.decompress(data) == joined and d.eof and not d.unused_data  # a single gzip member


@pytest.mark.parametrize("level", range(1, 10))
def test_every_gzip_level_is_one_standard_member_readers_take(level: int) -> None:
    """Levels 1-3 go through ISA-L, 4-9 through zlib: the same format for gzip(1), Python, v1 readers."""
    import gzip
    import shutil
    import subprocess
    import zlib

    from estat_ingest.formats.codec import encode_lines

    lines = [b'{"n":%d,"s":"%s"}\n' % (i, str(i * 7919).encode() * 5) for i in range(20_000)]
    joined = b"".join(lines)
    data = encode_lines(lines, len(joined), "gzip", level)
    assert data[:3] == b"\x1f\x8b\x08"  # gzip magic, deflate
    assert gzip.decompress(data) == joined
    d = zlib.decompressobj(31)
    assert d.decompress(data) == joined and d.eof and not d.unused_data
    assert len(data) < len(joined) / 3  # it compresses
    if shutil.which("gzip"):
        out = subprocess.run(["gzip", "-dc"], input=data, capture_output=True, check=True).stdout
        assert out == joined
