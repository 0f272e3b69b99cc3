"""The replayer in-process, against the in-package memory sink and a real temporary directory."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import orjson

from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks.base import Outcome, Result
from estat_ingest.sinks.memory import MemorySink
from tests.dlq.util import counter_value, data_files, ids_in, run_async, settings, wait_for, write_entries, write_entry


async def run_until_empty(tmp: Path, sink: MemorySink, timeout: float = 30.0, **kw: object
                          ) -> tuple[Pipeline, Metrics]:
    metrics = Metrics()
    p = Pipeline(settings(tmp, **kw), metrics, [sink])
    await p.start()
    store = p.lanes[0].store
    try:
        await wait_for(lambda: len(store.index) == 0, timeout, "the DLQ to empty")
    finally:
        await p.drain(5)
    return p, metrics


@run_async
async def test_replays_every_file_oldest_first_and_deletes_it(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    unixes = [1_700_000_000 + i * 60 for i in range(30)]
    shuffled = unixes[:]
    random.Random(1).shuffle(shuffled)
    want: list[str] = []
    for c, u in enumerate(shuffled):
        want += write_entry(d, u, c + 1, 5, compression="zstd" if c % 2 else "gzip")[1]
    sink = MemorySink()
    _, metrics = await run_until_empty(tmp_path, sink, dlq_max_age_s=0)
    got_names = [p.name for p in sink.delivered]
    assert [int(n[:10]) for n in got_names] == sorted(unixes)
    assert sorted(ids_in((p.name, p.data) for p in sink.delivered)) == sorted(want)
    assert data_files(d) == [] and not list(d.glob("*.meta.json"))
    assert counter_value(metrics, "dlq_events_reuploaded_total", sink="memory") == 150
    assert counter_value(metrics, "dlq_files_current", sink="memory") == 0
    # the partition and name are the batch's own, not the replay time's
    assert all(p.partition.startswith("dt=2023-11-") for p in sink.delivered)


@run_async
async def test_corrupt_file_is_quarantined_counted_and_never_sent(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    good, good_ids = write_entry(d, 1_700_000_100, 1, 4)
    bad, _ = write_entry(d, 1_700_000_000, 2, 7)
    whole = (d / bad).read_bytes()
    (d / bad).write_bytes(whole[: len(whole) - 6])  # torn: CRC/length trailer missing
    badjson, _ = write_entry(d, 1_700_000_050, 3, 3, data=__import__("gzip").compress(b'{"a":1}\nnot json\n{"b":2}\n'))
    sink = MemorySink()
    _, metrics = await run_until_empty(tmp_path, sink, dlq_max_age_s=0)
    assert [p.name for p in sink.delivered] == [good]
    assert ids_in((p.name, p.data) for p in sink.delivered) == good_ids
    assert sorted(data_files(d / "corrupt")) == sorted([bad, badjson])
    assert counter_value(metrics, "dlq_events_dropped_total", sink="memory", reason="corrupt") == 10


@run_async
async def test_poison_file_does_not_block_the_others(tmp_path: Path) -> None:
    class Poison(MemorySink):
        async def send(self, payload):  # type: ignore[no-untyped-def]
            if "_000001" in payload.name:
                self.calls.append(payload)
                return Result(Outcome.REJECT, "client_error")
            return await super().send(payload)

    d = tmp_path / "dlq" / "memory"
    poison, _ = write_entry(d, 1_700_000_000, 1, 3)  # the oldest: head of the line
    rest = write_entries(d, range(2, 12), 2)
    sink = Poison()
    _, metrics = await run_until_empty(tmp_path, sink, dlq_max_age_s=0)
    assert sorted(ids_in((p.name, p.data) for p in sink.delivered)) == sorted(rest)
    assert data_files(d / "rejected") == [poison]
    assert counter_value(metrics, "dlq_events_rejected_total", sink="memory") == 3


@run_async
async def test_sink_outage_probes_one_at_a_time_then_full_speed(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    ids = write_entries(d, range(1, 21), 2)
    sink = MemorySink()
    sink.script.extend([Result(Outcome.RETRY, "server_error")] * 4)
    from estat_ingest.dlq import replayer as rmod
    p, metrics = await run_until_empty(tmp_path, sink, dlq_max_age_s=0, dlq_replay_concurrency=4)
    assert sorted(ids_in((x.name, x.data) for x in sink.delivered)) == sorted(ids)
    # the 4 failures were single probes: 20 files + 4 failed probes, no more
    assert len(sink.calls) == 24
    assert rmod.SINK_BACKOFF.cap_s <= 5.0
    # attempts are shared with fresh uploads' metrics
    assert counter_value(metrics, "upload_attempts_total", sink="memory", outcome="retry",
                         reason="server_error") == 4
    del p


@run_async
async def test_auth_rejection_is_an_outage_not_a_reason_to_move_files_aside(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "memory"
    ids = write_entries(d, range(1, 6), 2)
    sink = MemorySink()
    sink.script.extend([Result(Outcome.REJECT, "auth", outage=True)] * 3)  # e.g. expired credentials, then fixed
    _, metrics = await run_until_empty(tmp_path, sink, dlq_max_age_s=0)
    assert sorted(ids_in((x.name, x.data) for x in sink.delivered)) == sorted(ids)
    assert data_files(d / "rejected") == []
    assert counter_value(metrics, "dlq_events_rejected_total", sink="memory") == 0


@run_async
async def test_files_left_by_other_worker_roots_are_replayed_too(tmp_path: Path) -> None:
    # `serve --workers 4` wrote DLQ_DIR/w3/memory; now a single `serve` runs: nothing may be orphaned
    ids = write_entry(tmp_path / "dlq" / "w3" / "memory", 1_700_000_000, 1, 3)[1]
    ids += write_entry(tmp_path / "dlq" / "memory", 1_700_000_001, 2, 2)[1]
    sink = MemorySink()
    await run_until_empty(tmp_path, sink, dlq_max_age_s=0)
    assert sorted(ids_in((x.name, x.data) for x in sink.delivered)) == sorted(ids)
    assert data_files(tmp_path / "dlq" / "w3" / "memory") == []


@run_async
async def test_a_file_that_keeps_failing_alone_is_moved_aside_after_max_attempts(tmp_path: Path) -> None:
    class FailsOne(MemorySink):
        async def send(self, payload):  # type: ignore[no-untyped-def]
            if "_000001" in payload.name:
                self.calls.append(payload)
                return Result(Outcome.RETRY, "server_error")  # retryable, but only ever for this file
            return await super().send(payload)

    d = tmp_path / "dlq" / "memory"
    stuck, _ = write_entry(d, 1_700_000_000, 1, 4)  # meta says 3 attempts already (the fresh ones)
    ids = write_entries(d, range(2, 6), 1)
    sink = FailsOne()
    _, metrics = await run_until_empty(tmp_path, sink, dlq_max_age_s=0, dlq_max_attempts=2)
    assert sorted(ids_in((x.name, x.data) for x in sink.delivered)) == sorted(ids)
    assert [x.name for x in sink.calls].count(stuck) == 2
    assert data_files(d / "rejected") == [stuck]
    meta = orjson.loads((d / "rejected" / (stuck + ".meta.json")).read_bytes())
    assert meta["attempts"] == 5 and meta["replay_failures"] == 2 and meta["num_events"] == 4
    assert meta["rejected_reason"] == "max_attempts:server_error"
    assert counter_value(metrics, "dlq_events_rejected_total", sink="memory") == 4


@run_async
async def test_shutdown_mid_replay_gives_the_claim_back_and_nothing_is_lost(tmp_path: Path) -> None:
    class Hangs(MemorySink):
        async def send(self, payload):  # type: ignore[no-untyped-def]
            self.calls.append(payload)
            await asyncio.Event().wait()  # never answers
            raise AssertionError("unreachable")

    d = tmp_path / "dlq" / "memory"
    name, ids = write_entry(d, 1_700_000_000, 1, 6)
    sink = Hangs()
    sink.timeout_s = 60
    p = Pipeline(settings(tmp_path, dlq_max_age_s=0), Metrics(), [sink])
    await p.start()
    try:
        await wait_for(lambda: bool(list(d.glob("*.claim-*"))) and sink.calls, 10, "a replay in flight")
    finally:
        await p.drain(5)
    assert data_files(d) == [name] and not list(d.glob("*.claim-*"))
    assert (d / (name + ".meta.json")).exists()
    sink2 = MemorySink()  # the next start delivers it
    await run_until_empty(tmp_path, sink2, dlq_max_age_s=0)
    assert ids_in((x.name, x.data) for x in sink2.delivered) == ids
