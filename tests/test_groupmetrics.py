"""groupmetrics.py: the merge of the workers' registries (sums, gauge rules, per-process series),
and the parent's gather over real unix sockets — a worker that is slow, garbled, restarted or
gone never makes a summed counter go back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from estat_ingest import groupmetrics as gm
from estat_ingest.metrics import Metrics
from tests.dlq.util import run_async


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return got.get((name, tuple(sorted(labels.items()))))


def worker_metrics(accepted: int, ready: bool, oldest: float, unavailable: int) -> Metrics:
    m = Metrics()
    m.declare_sinks(["file"])
    m.http_accepted.inc(accepted)  # a LoopCounter: folded when the snapshot is taken
    m.rejected.labels("too_large").inc(accepted // 2)
    m.batch_events.labels("file").observe(accepted)
    m.queue_capacity.set(4000)
    m.queue_depth.set(accepted)
    m.ready.set(1 if ready else 0)
    m.dlq_oldest_age.labels("file").set(oldest)
    m.dlq_unavailable.labels("file").set(unavailable)
    return m


def snap(m: Metrics, worker: int, started: float = 1.0) -> gm.Snapshot:
    return gm.decode(gm.encode(worker, started, m.registry))  # through the wire format


def test_counters_and_histograms_sum_gauges_follow_their_rule_process_series_stay_apart() -> None:
    a, b = worker_metrics(3, True, 10.0, 0), worker_metrics(4, True, 50.0, 1)
    parent = gm.families_of(gm._supervisor_registry())
    got = samples(gm.render(gm.merge([snap(a, 0), snap(b, 1)], expected=2, scraped=2, supervisor=parent)))
    assert value(got, "http_requests_accepted_total") == 7
    assert value(got, "http_requests_rejected_total", reason="too_large") == 1 + 2
    assert value(got, "batch_events_count", sink="file") == 2
    assert value(got, "batch_events_sum", sink="file") == 7
    assert value(got, "batch_events_bucket", sink="file", le="10.0") == 2
    assert value(got, "ingest_queue_capacity_events") == 8000  # capacities: summed
    assert value(got, "ingest_queue_depth_events") == 7  # per-worker state: summed
    assert value(got, "ingest_ready") == 1  # every worker ready
    assert value(got, "dlq_oldest_file_age_seconds", sink="file") == 50  # the group's oldest
    assert value(got, "dlq_unavailable", sink="file") == 1  # one worker's DLQ refuses
    assert value(got, "estat_ingest_workers") == 2 and value(got, "estat_ingest_workers_scraped") == 2
    builds = [k for k in got if k[0] == "estat_ingest_build_info"]
    assert len(builds) == 1 and got[builds[0]] == 1
    assert sum(1 for k in got if k[0] == "python_info") == 1
    for worker in ("0", "1", gm.SUPERVISOR):  # one series per process, labelled
        assert (value(got, "process_cpu_seconds_total", worker=worker) or 0) > 0
        assert (value(got, "process_resident_memory_bytes", worker=worker) or 0) > 0
    assert value(got, "process_cpu_seconds_total") is None  # never an unlabelled sum


def test_ready_only_when_every_worker_is_ready() -> None:
    a, b = worker_metrics(1, True, 0, 0), worker_metrics(1, False, 0, 0)
    assert value(samples(gm.render(gm.merge([snap(a, 0), snap(b, 1)], 2, 2))), "ingest_ready") == 0
    # a worker missing (down, or still starting) is not ready either
    assert value(samples(gm.render(gm.merge([snap(a, 0)], 2, 1))), "ingest_ready") == 0
    # and with no worker at all the group still says so
    got = samples(gm.render(gm.merge([], 2, 0)))
    assert value(got, "ingest_ready") == 0 and value(got, "estat_ingest_workers") == 2
    assert value(got, "estat_ingest_workers_scraped") == 0


def test_promtool_accepts_the_merged_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; `make test` installs it)")
    a, b = worker_metrics(3, True, 10.0, 0), worker_metrics(4, False, 50.0, 1)
    b.api_key_requests.labels("only-in-b").inc()  # a labelled series only one worker has
    parent = gm.families_of(gm._supervisor_registry())
    text = gm.render(gm.merge([snap(a, 0), snap(b, 1)], 2, 2, parent, [gm.Family(
        "http_requests", "counter", "x", {("http_requests_total", ()): 5.0})]))
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------ over sockets


@contextlib.asynccontextmanager
async def group(n: int) -> AsyncIterator[tuple[gm.GroupLink, list[Metrics], list[gm.SnapshotServer]]]:
    link = gm.GroupLink(gm.make_run_dir(), n)
    metrics = [worker_metrics(10 * (i + 1), True, 0, 0) for i in range(n)]
    servers = [gm.SnapshotServer(m, link, i) for i, m in enumerate(metrics)]
    try:
        for s in servers:
            await s.start()
        yield link, metrics, servers
    finally:
        for s in servers:
            await s.close()
        gm.remove_run_dir(link.run_dir)


async def scrape(agg: gm.Aggregator) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(await agg.render())


@run_async
async def test_a_gather_reads_every_worker_now() -> None:
    async with group(2) as (link, metrics, _):
        assert oct(os.stat(link.run_dir).st_mode & 0o777) == "0o700"
        agg = gm.Aggregator(link)
        got = await scrape(agg)
        assert value(got, "http_requests_accepted_total") == 30
        assert value(got, "estat_ingest_workers_scraped") == 2
        metrics[1].http_accepted.inc(5)  # increments since the last scrape are in the next one
        assert value(await scrape(agg), "http_requests_accepted_total") == 35
        # the parent's socket answers with the same text (what a worker's /metrics relays)
        await agg.start()
        try:
            via_parent = samples(await gm.fetch(link.parent_socket, 5))
        finally:
            await agg.close()
        assert value(via_parent, "http_requests_accepted_total") == 35


@run_async
async def test_a_slow_or_garbled_worker_counts_with_its_last_values() -> None:
    async with group(2) as (link, metrics, servers):
        agg = gm.Aggregator(link, timeout_s=0.3)
        assert value(await scrape(agg), "http_requests_accepted_total") == 30
        metrics[1].http_accepted.inc(100)
        await servers[1].close()

        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)  # a worker whose loop is stuck: accepted, never answered
            writer.close()

        for behaviour in ("slow", "garbled"):
            Path(link.worker_socket(1)).unlink(missing_ok=True)
            if behaviour == "slow":
                stand_in = await asyncio.start_unix_server(mute, link.worker_socket(1))
            else:
                async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    writer.write(b"not a snapshot")
                    await writer.drain()
                    writer.close()

                stand_in = await asyncio.start_unix_server(garble, link.worker_socket(1))
            try:
                got = await scrape(agg)
            finally:
                stand_in.close()
            assert value(got, "http_requests_accepted_total") == 30  # worker 1's last word: 20
            assert value(got, "estat_ingest_workers_scraped") == 1
            assert value(got, "ingest_ready") == 1  # slow is not down


@run_async
async def test_a_restarted_or_dead_worker_never_makes_a_sum_go_back() -> None:
    async with group(2) as (link, metrics, servers):
        agg = gm.Aggregator(link)
        assert value(await scrape(agg), "http_requests_accepted_total") == 30
        # worker 1 restarts: a new process (another start time), counting from 0 again
        await servers[1].close()
        fresh = Metrics()
        fresh.http_accepted.inc(2)
        reborn = gm.SnapshotServer(fresh, link, 1)
        reborn.started = servers[1].started + 1
        await reborn.start()
        try:
            got = await scrape(agg)
            assert value(got, "http_requests_accepted_total") == 10 + 20 + 2
            fresh.http_accepted.inc(3)
            assert value(await scrape(agg), "http_requests_accepted_total") == 10 + 20 + 5
        finally:
            await reborn.close()
        # now it is gone (nobody listens on its socket): its count stays, its gauges go, not ready
        Path(link.worker_socket(1)).unlink(missing_ok=True)
        got = await scrape(agg)
        assert value(got, "http_requests_accepted_total") == 10 + 20 + 5
        assert value(got, "ingest_queue_capacity_events") == 4000
        assert value(got, "ingest_ready") == 0
        assert value(got, "estat_ingest_workers_scraped") == 1
        assert value(got, "process_cpu_seconds_total", worker="1") is None
