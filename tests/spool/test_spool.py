"""The durable spool in-process: ordering of fsyncs and answers, group commit, failed rounds, torn
files and recovery of a dead owner's spool (ACK_MODE=durable, DESIGN.md §10)."""

from __future__ import annotations

import asyncio
import errno
import gc
import gzip
import os
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from estat_ingest.config import Settings
from estat_ingest.formats.codec import compress
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.batcher import Batch
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.memory import MemorySink
from estat_ingest.spool import lease
from estat_ingest.spool.segment import spool_name
from estat_ingest.spool.writer import SpoolError
from tests.dlq.util import counter_value, run_async, wait_for


def settings(tmp: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"dlq_dir": str(tmp / "dlq"), "instance_id": "t", "ack_mode": "durable",
                            "flush_interval_s": 60.0, "dlq_max_age_s": 0}
    base.update(kw)
    return Settings.from_env({}, **base)


def line(i: int) -> bytes:
    return orjson.dumps({"ts": 1_790_000_000, "body": f'{{"i":{i}}}', "id": f"e{i:06d}"}) + b"\n"


def ids_of(lines: list[bytes]) -> list[str]:
    return [orjson.loads(x)["id"] for x in lines]


class DiskFull:
    """A stand-in for a disk that fills up and is freed again: while `on`, os.pwrite (the spool's
    appends) and os.write (its probe, the DLQ's and the file sink's writes) fail with ENOSPC."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        real_pwrite, real_write = os.pwrite, os.write

        def pwrite(fd: int, data: Any, off: int) -> int:
            self._check()
            return real_pwrite(fd, data, off)

        def write(fd: int, data: Any) -> int:
            self._check()
            return real_write(fd, data)

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "write", write)

    def _check(self) -> None:
        if self.on:
            raise OSError(errno.ENOSPC, "No space left on device")


@run_async
async def test_no_answer_before_the_fsync_that_covers_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ticket is answered after an fdatasync of its file returned with the file already
    holding the member that carries its event (a wrapped os.fdatasync records each sync)."""
    events: list[tuple[str, Any]] = []  # ("sync", (path, size)) | ("ack", i) in the order they happened
    content: dict[str, bytes] = {}  # each file as its last fsync left it
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        path, size = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size
        with open(path, "rb") as f:  # (the spool's own fd is write-only)
            content[path] = f.read(size)
        events.append(("sync", (path, size)))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    sink = MemorySink()
    p = Pipeline(settings(tmp_path, batch_max_events=40), Metrics(), [sink])
    await p.start()
    try:
        tickets = []
        for i in range(100):  # a burst, then a trickle: several requests per round, then one each
            assert p.queue.offer((time.time(), line(i)))
            t = p.queue.ticket()
            t.add_done_callback(lambda f, i=i: events.append(("ack", i)))
            tickets.append(t)
            if i >= 80:
                await t
        await asyncio.gather(*tickets)
        await p.flush_and_wait()
    finally:
        await p.drain(5)
    # where each event is on disk: the end offset of the member that carries it
    ends: dict[int, tuple[str, int]] = {}
    for path, data in content.items():
        off = 0
        while off < len(data):
            d = zlib.decompressobj(31)
            text = d.decompress(data[off:])
            assert d.eof
            off = len(data) - len(d.unused_data)
            for rec in text.splitlines():
                ends[int(orjson.loads(rec)["id"][1:])] = (path, off)
    assert sorted(ends) == list(range(100))
    synced: dict[str, int] = {}
    rounds = 0
    for kind, what in events:
        if kind == "sync":
            path, size = what
            synced[path] = max(synced.get(path, 0), size)
            rounds += 1
        else:
            path, end = ends[what]
            assert synced.get(path, 0) >= end, f"event {what} answered before its bytes were synced"
    assert rounds < 100  # the burst shared rounds (group commit)
    assert sorted(ids_of(sink.lines())) == [f"e{i:06d}" for i in range(100)]
    assert p.spool is not None and not Path(p.spool.dir).exists()  # every file delivered and deleted


@run_async
async def test_a_failed_round_answers_503_and_keeps_nothing_of_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing: those requests fail, their events are taken back out; the next rounds
    succeed and exactly the acknowledged events are delivered."""
    sink = MemorySink()
    m = Metrics()
    p = Pipeline(settings(tmp_path, batch_max_events=1000), m, [sink])
    await p.start()
    disk = DiskFull(monkeypatch)
    acked: list[int] = []
    try:
        for phase, bad in ((0, False), (1, True), (2, False)):
            disk.on = bad
            tickets = []
            for i in range(phase * 10, phase * 10 + 10):
                assert p.queue.offer((time.time(), line(i)))
                tickets.append((i, p.queue.ticket()))
            for i, t in tickets:
                try:
                    await t
                    acked.append(i)
                except SpoolError as err:
                    assert bad and err.reason == "no_space"
            assert p.spool is not None and p.spool.healthy is (not bad)
        await p.flush_and_wait()
    finally:
        await p.drain(5)
    assert acked == list(range(10)) + list(range(20, 30))
    assert sorted(ids_of(sink.lines())) == [f"e{i:06d}" for i in acked]
    assert counter_value(m, "spool_write_errors_total", reason="no_space") >= 1
    assert p.queue.held_bytes == 0  # the taken-back records gave their bytes back


def dead_owner(spool: Path, owner: str) -> Path:
    """An owner directory whose lease names this host and a pid that does not exist."""
    d = spool / owner
    (d / "memory").mkdir(parents=True)
    me = lease.Holder.me()
    lease.write_lease(str(d), lease.Holder(me.host, me.boot_id, 2**22 + 17, "1"))
    return d


@run_async
async def test_a_dead_owners_spool_is_recovered_torn_tail_cut_and_counted(tmp_path: Path) -> None:
    spool = tmp_path / "dlq" / "spool"
    d = dead_owner(spool, "t-dead01")
    name = "1790000000_t-dead01_000001.jsonl.gz"
    good = compress(b"".join(line(i) for i in range(5)), "gzip", 1) + \
        compress(b"".join(line(i) for i in range(5, 9)), "gzip", 1)
    torn = compress(b"".join(line(i) for i in range(9, 12)), "gzip", 1)[:-7]  # a member cut short
    (d / "memory" / spool_name("dt=2026-09-22/hr=02", name)).write_bytes(good + torn)
    (d / "memory" / spool_name("dt=2026-09-22/hr=02", "1790000001_t-dead01_000002.jsonl.gz")).write_bytes(torn)
    sink = MemorySink()
    m = Metrics()
    p = Pipeline(settings(tmp_path), m, [sink])
    await p.start()
    try:
        await wait_for(lambda: len(sink.lines()) == 9, 20, "the recovered events to be replayed")
    finally:
        await p.drain(5)
    assert sorted(ids_of(sink.lines())) == [f"e{i:06d}" for i in range(9)]
    [payload] = sink.delivered
    assert payload.name == name and payload.partition == "dt=2026-09-22/hr=02"  # the fixed key
    assert gzip.decompress(payload.data).count(b"\n") == 9
    assert counter_value(m, "spool_events_recovered_total", how="restart") == 9
    assert counter_value(m, "spool_torn_bytes_total") == 2 * len(torn)
    assert not d.exists()  # claimed, emptied, removed


@run_async
async def test_a_live_peers_spool_is_left_alone_until_its_lease_is_stale(tmp_path: Path) -> None:
    spool = tmp_path / "dlq" / "spool"
    d = spool / "peer-abc"
    (d / "memory").mkdir(parents=True)
    lease.write_lease(str(d), lease.Holder("another-host", "boot", 1, "1"))  # fresh lease, other host
    name = "1790000000_peer-abc_000001.jsonl.gz"
    (d / "memory" / spool_name("dt=2026-09-22/hr=02", name)).write_bytes(
        compress(b"".join(line(i) for i in range(3)), "gzip", 1))
    sink = MemorySink()
    m = Metrics()
    p = Pipeline(settings(tmp_path, spool_adopt_after_s=2), m, [sink])
    await p.start()
    try:
        assert d.exists() and not sink.delivered  # alive: not adopted at start
        await wait_for(lambda: len(sink.lines()) == 3, 30, "the stale peer's spool to be adopted")
    finally:
        await p.drain(5)
    assert counter_value(m, "spool_events_recovered_total", how="adoption") == 3
    assert sink.delivered[0].name == name


@run_async
async def test_a_dlq_claim_of_a_dead_owner_is_recovered_at_once(tmp_path: Path) -> None:
    """DLQ_CLAIM_TIMEOUT is 5 minutes, but the claim's owner has a lease that says it is dead."""
    from tests.dlq.util import write_entry

    dead_owner(tmp_path / "dlq" / "spool", "t-gone42")
    d = tmp_path / "dlq" / "memory"
    name, ids = write_entry(d, int(time.time()) - 10, 1, 4)
    os.rename(d / name, d / f"{name}.claim-{int(time.time())}-t-gone42")
    sink = MemorySink()
    p = Pipeline(settings(tmp_path, dlq_claim_timeout_s=300), Metrics(), [sink])
    await p.start()
    try:
        await wait_for(lambda: len(sink.lines()) == 4, 20, "the claimed file to be recovered and replayed")
    finally:
        await p.drain(5)
    assert sorted(ids_of(sink.lines())) == sorted(ids)


@run_async
async def test_through_http_a_failing_spool_answers_503_and_turns_ready_off_until_it_writes_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() with the fast front: an accepted event is answered 200 only after its fsync; while the
    spool cannot write, /collect answers 503 spool_no_space with Retry-After and /ready 503; once a
    write succeeds again (the background probe), both recover. Only the 200s are delivered."""
    import aiohttp

    from estat_ingest.app import serve
    from estat_ingest.sockets import make_socket

    s = settings(tmp_path, http_front="fast", file_sink_dir=str(tmp_path / "data"), sinks=("file",),
                 spool_adopt_after_s=2)  # the lease watcher (and its probe) runs every 0.5 s
    disk = DiskFull(monkeypatch)
    sock = make_socket("127.0.0.1", 0, listen=False)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(serve(s, sock=sock, shutdown_trigger=stop, install_signals=False))
    acked: list[int] = []
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for _ in range(500):
                try:
                    async with http.get("/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)

            async def post(i: int) -> tuple[int, dict[str, str], str]:
                async with http.post("/collect", data=orjson.dumps({"i": i})) as r:
                    return r.status, dict(r.headers), await r.text()

            for i in range(5):
                status, _, _ = await post(i)
                assert status == 200
                acked.append(i)
            disk.on = True
            status, headers, text = await post(100)
            assert status == 503 and headers["Retry-After"] == "1" and "spool disk is full" in text
            async with http.get("/ready") as r:
                assert r.status == 503
            async with http.get("/metrics") as r:
                metrics = await r.text()
            assert 'http_requests_rejected_total{reason="spool_no_space"} 1.0' in metrics
            assert "http_requests_accepted_total 5.0" in metrics
            disk.on = False
            for _ in range(500):  # the probe finds the disk writable again
                async with http.get("/ready") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.02)
            for i in range(5, 8):
                status, _, _ = await post(i)
                assert status == 200
                acked.append(i)
    finally:
        stop.set()
        assert await server == 0
    from tests.helpers import file_objects, records_of
    got = sorted(orjson.loads(r["body"])["i"] for _, r in records_of(file_objects(tmp_path / "data")))
    assert got == acked


@run_async
async def test_fan_out_every_sinks_copy_is_durable_before_the_answer(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sinks: a ticket is answered only after both lanes' spool files hold its event, synced."""
    synced: dict[str, int] = {}
    acked_when: dict[int, dict[str, int]] = {}
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        real(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced[path.split("/spool/")[1].split("/")[1]] = os.fstat(fd).st_size  # by sink directory

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    a, b = MemorySink(name="alpha"), MemorySink(name="beta")
    p = Pipeline(settings(tmp_path, batch_max_events=1000), Metrics(), [a, b])
    await p.start()
    try:
        for i in range(20):
            assert p.queue.offer((time.time(), line(i)))
            t = p.queue.ticket()
            t.add_done_callback(lambda f, i=i: acked_when.__setitem__(i, dict(synced)))
            await t
        await p.flush_and_wait()
    finally:
        await p.drain(5)
    for i in range(20):
        assert set(acked_when[i]) == {"alpha", "beta"}, f"event {i} answered before both copies were synced"
    assert sorted(ids_of(a.lines())) == sorted(ids_of(b.lines())) == [f"e{i:06d}" for i in range(20)]


@run_async
async def test_with_no_traffic_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle durable server makes no group commit: no fsync, no spool file (only its lease)."""
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    p = Pipeline(settings(tmp_path), Metrics(), [MemorySink()])
    await p.start()
    try:
        assert p.spool is not None
        await asyncio.sleep(1.5)  # three turns of the lease watcher
        assert calls == []
        assert [f.name for f in Path(p.spool.dir).rglob("*") if f.is_file()] == ["lease.json"]
    finally:
        await p.drain(5)


@run_async
async def test_memory_mode_after_a_durable_run_still_delivers_the_dead_spool(tmp_path: Path) -> None:
    """Switching ACK_MODE back to memory must not strand what a crashed durable run acknowledged."""
    d = dead_owner(tmp_path / "dlq" / "spool", "t-0a0b0c")
    (d / "memory" / spool_name("dt=2026-09-22/hr=02", "1790000000_t-0a0b0c_000001.jsonl.gz")).write_bytes(
        compress(b"".join(line(i) for i in range(6)), "gzip", 1))
    sink = MemorySink()
    m = Metrics()
    p = Pipeline(settings(tmp_path, ack_mode="memory"), m, [sink])
    assert p.spool is None
    await p.start()
    try:
        await wait_for(lambda: len(sink.lines()) == 6, 20, "the dead spool's events to be replayed")
    finally:
        await p.drain(5)
    assert sorted(ids_of(sink.lines())) == [f"e{i:06d}" for i in range(6)]
    assert counter_value(m, "spool_events_recovered_total", how="restart") == 6


@run_async
async def test_a_delivered_batch_is_freed_without_waiting_for_the_cyclic_gc(tmp_path: Path) -> None:
    """A durable batch and its spool state refer to each other; the cycle is broken when the batch is
    sealed, so its lines are freed by reference counting once it is delivered (under steady traffic
    they used to wait for a full collection, and RSS grew by ~100 MB a minute)."""
    sink = MemorySink()
    p = Pipeline(settings(tmp_path, batch_max_events=10), Metrics(), [sink])
    await p.start()
    gc.collect()
    gc.disable()
    try:
        tickets = []
        for i in range(200):  # 20 batches
            assert p.queue.offer((time.time(), line(i)))
            tickets.append(p.queue.ticket())
            if i % 10 == 9:
                await asyncio.gather(*tickets)
        await asyncio.gather(*tickets)
        await p.flush_and_wait()
        left = [b for b in gc.get_objects() if isinstance(b, Batch) and b.lines]
        # the last batch may still be a local of the dispatcher's or the committer's loop
        assert len(left) <= 1, f"{len(left)} of 20 delivered batches still in memory"
    finally:
        gc.enable()
        await p.drain(5)
    assert sorted(ids_of(sink.lines())) == [f"e{i:06d}" for i in range(200)]
