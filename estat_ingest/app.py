"""Wiring: serve(), the one lifecycle of a server process, for either HTTP front.

`serve()` enters its parts with an AsyncExitStack, in order — the signal handlers, how the
metrics are read (a worker's snapshot socket for its parent; the METRICS_ADDR listener), the
pipeline (sinks, DLQ stores, the durable spool and its recovery, the loops), the Collector's
acceptance, the HTTP front (`http.fronts.make_front`: aiohttp, or the httptools front of http/fast/) — and
leaves them in reverse, only what was entered: a part that fails to start undoes what started
before it. Leaving is the shutdown of DESIGN.md §7: the first signal turns /ready 503 → the front
stops listening → serve() waits (bounded) for requests inside /collect (in durable mode, for their
fsync) → the front closes every connection → the Collector stops accepting → the pipeline drains
with what is left of SHUTDOWN_TIMEOUT → undelivered batches go to the DLQ → exit 0. The queue is
closed only after the HTTP side has fully stopped, so no handler ever meets a closed queue. A
second signal skips straight to the spill. Tests use this same path (`shutdown_trigger`, `sock`).

The pipeline's loops are tasks it owns and awaits at drain, not a TaskGroup: a TaskGroup would
cancel every uploader (and the batches in their hands) when one task fails, and the drain needs
to give its tasks a deadline and then a second, spilling pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from estat_ingest import runtime
from estat_ingest.config import Settings
from estat_ingest.groupmetrics import PARENT_TIMEOUT_S, GroupLink, SnapshotServer, fetch
from estat_ingest.http.collect import Collector
from estat_ingest.http.fronts import HttpFront, make_front
from estat_ingest.http.policy import Reply, metrics_reply
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks import build_sink
from estat_ingest.sinks.base import Sink
from estat_ingest.sockets import make_socket

log = logging.getLogger("estat_ingest")


@dataclass
class Lifecycle:
    """Shutdown budget shared by the HTTP drain and the pipeline drain."""

    settings: Settings
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)  # a second signal: skip the waits
    started_at: float | None = None  # monotonic time of the first signal

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
        self.stop.set()

    async def wait_for_stop(self, trigger: asyncio.Event | None = None) -> None:
        """Until a signal (or `trigger`, the test seam) starts the shutdown."""
        waiters = [asyncio.ensure_future(self.stop.wait())]
        if trigger is not None:
            waiters.append(asyncio.ensure_future(trigger.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self.begin()

    def remaining(self) -> float:
        if self.started_at is None:
            return self.settings.shutdown_timeout_s
        return max(0.0, self.settings.shutdown_timeout_s - (time.monotonic() - self.started_at))

    def http_grace(self) -> float:
        """In-flight requests may take at most this long: a fifth of the budget, at most 5 s."""
        return min(5.0, self.settings.shutdown_timeout_s / 5)

    def delivery_budget(self) -> float:
        """What the pipeline may spend delivering; the rest is kept for writing the spill."""
        reserve = min(2.0, self.settings.shutdown_timeout_s / 10)
        return max(0.0, self.remaining() - reserve)


def _pipeline(settings: Settings, metrics: Metrics, sinks: Sequence[Sink] | None, worker: int | None,
              dlq_root: str | None) -> Pipeline:
    return Pipeline(
        settings,
        metrics,
        list(sinks) if sinks is not None else [build_sink(n, settings, metrics) for n in settings.sinks],
        worker=worker,
        dlq_root=dlq_root,
    )


async def _drain(pipeline: Pipeline, lifecycle: Lifecycle) -> None:
    t0 = time.monotonic()
    report = await pipeline.drain(lifecycle.delivery_budget())
    d = report.drain  # what this drain did; the lifetime_* fields count since start
    log.info("shutdown complete", extra={
        "delivered_events": d.delivered_events, "spilled_events": d.spilled_events,
        "lost_events": d.lost_events, "dropped_events": d.dropped_events, "aborted": report.aborted,
        "drain_seconds": round(time.monotonic() - t0, 3),
        "lifetime_delivered_events": report.delivered_events, "lifetime_spilled_events": report.spilled_events,
        "lifetime_lost_events": report.lost_events, "lifetime_dropped_events": report.dropped_events})


def _set_ready(collector: Collector, metrics: Metrics, ready: bool) -> None:
    collector.ready = ready
    metrics.ready.set(1 if ready else 0)


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: asyncio.Event | None = None,
    sinks: Sequence[Sink] | None = None,
    metrics: Metrics | None = None,
    worker: int | None = None,
    dlq_root: str | None = None,
    sock: socket.socket | None = None,
    metrics_sock: socket.socket | None = None,
    group: GroupLink | None = None,
    install_signals: bool = True,
    settle_gc: bool = False,
) -> int:
    """Run until SIGTERM/SIGINT (or `shutdown_trigger`), drain, return the exit code.

    `group`: this process is worker `worker` of `serve --workers N` (its parent reads its registry,
    its /metrics answers the group's). `metrics_sock`: METRICS_ADDR, bound (one process only).
    `settle_gc`: this process exists to serve (the CLI's): once listening, `runtime.settle_gc`."""
    lifecycle = Lifecycle(settings)
    metrics = metrics or Metrics()
    loop = asyncio.get_running_loop()
    # a port in use fails here, before anything else started (the CLI binds it even earlier)
    own_sock = sock or make_socket(settings.http_host, settings.http_port, listen=False)
    own_metrics_sock = metrics_sock
    if own_metrics_sock is None and settings.metrics_host and group is None:
        try:
            own_metrics_sock = make_socket(settings.metrics_host, settings.metrics_port, listen=False)
        except BaseException:
            if sock is None:
                own_sock.close()
            raise
    pipeline = _pipeline(settings, metrics, sinks, worker, dlq_root)
    collector = Collector(settings, pipeline.queue, metrics)
    collector.relieve = pipeline.relieve
    spool = pipeline.spool
    if spool is not None:  # /ready: the spool must be able to write (DESIGN.md §10)
        collector.healthy = lambda: spool.healthy
    front = make_front(settings, collector, metrics, lifecycle)

    def on_signal(signame: str) -> None:
        if lifecycle.started_at is None:
            log.info("signal received: draining", extra={"signal": signame,
                                                         "budget_seconds": settings.shutdown_timeout_s})
            lifecycle.begin()
            _set_ready(collector, metrics, False)
        else:
            log.warning("second signal: spilling to the dlq now", extra={"signal": signame})
            lifecycle.hurry.set()
            pipeline.abort()

    async with contextlib.AsyncExitStack() as stack:
        if sock is None:
            stack.callback(own_sock.close)
        if own_metrics_sock is not None and metrics_sock is None:
            stack.callback(own_metrics_sock.close)
        if install_signals:  # entered first, left last: a second signal still works during the drain
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig.name)
                stack.callback(loop.remove_signal_handler, sig)
        # before the pipeline, left after its drain: the start-up and the whole drain can be scraped
        await _expose_metrics(stack, settings, metrics, collector, group, worker, own_metrics_sock)
        await pipeline.start()  # sinks, DLQ, spool recovery, replayers; undoes itself if it fails
        stack.push_async_callback(_drain, pipeline, lifecycle)
        collector.accepting = True
        stack.callback(setattr, collector, "accepting", False)  # only once the HTTP side stopped
        await front.start(own_sock)
        stack.push_async_callback(_stop_http, front, collector, metrics, lifecycle)
        _set_ready(collector, metrics, True)
        if settle_gc:
            runtime.settle_gc()
        host, port = own_sock.getsockname()[:2]
        if own_metrics_sock is not None:
            mhost, mport = own_metrics_sock.getsockname()[:2]
            extra_addr = {"metrics_addr": f"{mhost}:{mport}"}
        else:
            extra_addr = {}
        log.info("listening", extra={"addr": f"{host}:{port}", **extra_addr, "sinks": list(settings.sinks),
                                     "dlq_dir": pipeline.dlq_root, "instance": pipeline.namer.instance,
                                     "http_front": settings.http_front, "ack_mode": settings.ack_mode})
        await lifecycle.wait_for_stop(shutdown_trigger)
    return 0


async def _expose_metrics(stack: contextlib.AsyncExitStack, settings: Settings, metrics: Metrics,
                          collector: Collector, group: GroupLink | None, worker: int | None,
                          metrics_sock: socket.socket | None) -> None:
    """How this process's metrics are read. A worker of `serve --workers N` answers its parent's
    requests for a snapshot of its registry, and its /metrics answers the group's merge, which the
    parent makes (groupmetrics.py). With METRICS_ADDR the public port answers /metrics 404, and one
    process serves /metrics, /health and /ready on METRICS_ADDR itself (with workers, the parent)."""
    if group is not None and worker is not None:
        snapshots = SnapshotServer(metrics, group, worker)
        await snapshots.start()
        stack.push_async_callback(snapshots.close)
        metrics.group = functools.partial(fetch, group.parent_socket, PARENT_TIMEOUT_S)
    if not settings.metrics_host:
        return
    metrics.public = False
    if metrics_sock is None:
        return  # a worker: its parent listens on METRICS_ADDR
    from estat_ingest.http.metrics_listener import MetricsListener

    async def scrape() -> Reply:
        return metrics_reply(metrics)

    async def ready() -> bool:
        return collector.ready and collector.healthy()

    listener = MetricsListener(scrape, ready)
    await listener.start(metrics_sock)
    stack.push_async_callback(listener.close)


async def _stop_http(front: HttpFront, collector: Collector, metrics: Metrics, lifecycle: Lifecycle) -> None:
    """/ready 503, no new connections, the requests inside /collect finish (bounded), close."""
    _set_ready(collector, metrics, False)
    await front.stop_listening()
    await _wait_in_flight(collector, lifecycle)
    await front.close()


async def _wait_in_flight(collector: Collector, lifecycle: Lifecycle) -> None:
    """Until no request is inside /collect (slow bodies included), at most `http_grace`; a second
    signal ends the wait at once."""
    drained = asyncio.ensure_future(collector.inflight.wait_zero(lifecycle.http_grace()))
    hurry = asyncio.ensure_future(lifecycle.hurry.wait())
    await asyncio.wait({drained, hurry}, return_when=asyncio.FIRST_COMPLETED)
    hurry.cancel()
    if not drained.done():
        drained.cancel()
    if collector.inflight.count:
        log.warning("in-flight requests still open after the grace period", extra={
            "requests": collector.inflight.count})
