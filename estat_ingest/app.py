"""Wiring: serve() with the start-up and shutdown order for either HTTP front, and
create_app(settings) → aiohttp Application (in-process servers in tests).

`serve()` builds the pipeline and the Collector, then the front `HTTP_FRONT` names
(`http.fronts.make_front`: aiohttp, or the httptools front of http/fast/).
Shutdown (DESIGN.md §7) is the same code for both: the first signal turns /ready 503 → the
front stops listening → serve() waits (bounded) for requests inside /collect → the front closes
every connection → the pipeline drains with what is left of SHUTDOWN_TIMEOUT → undelivered
batches go to the DLQ → exit 0. The queue is closed only after the HTTP side has fully stopped,
so no handler ever meets a closed queue. A second signal skips straight to the spill.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from estat_ingest.config import Settings
from estat_ingest.http.collect import Collector
from estat_ingest.http.fronts import make_front
from estat_ingest.http.routes import COLLECTOR, METRICS, build_app
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks import build_sink
from estat_ingest.sinks.base import Sink
from estat_ingest.sockets import make_socket

log = logging.getLogger("estat_ingest")

PIPELINE: web.AppKey[Pipeline] = web.AppKey("pipeline", Pipeline)


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


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    sinks: Sequence[Sink] | None = None,
    lifecycle: Lifecycle | None = None,
    worker: int | None = None,
    dlq_root: str | None = None,
) -> web.Application:
    """The aiohttp application with the pipeline started and drained by its cleanup_ctx (for
    in-process servers such as aiohttp's TestServer; `serve()` runs the pipeline itself)."""
    metrics = metrics or Metrics()
    lifecycle = lifecycle or Lifecycle(settings)
    pipeline = _pipeline(settings, metrics, sinks, worker, dlq_root)
    collector = Collector(settings, pipeline.queue, metrics)
    app = build_app(collector, metrics)
    app[PIPELINE] = pipeline

    async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
        await pipeline.start()
        collector.accepting = True
        yield
        collector.accepting = False
        await _drain(pipeline, lifecycle)

    app.cleanup_ctx.append(pipeline_ctx)
    return app


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


def set_ready(app: web.Application, ready: bool) -> None:
    _set_ready(app[COLLECTOR], app[METRICS], ready)


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
    install_signals: bool = True,
) -> int:
    """Run until SIGTERM/SIGINT (or `shutdown_trigger`), drain, return the exit code.

    One path for both fronts (`HTTP_FRONT`), DESIGN.md §7: /ready 503 → the listener closes →
    requests inside /collect finish (bounded by `http_grace`, or until a second signal) → every
    connection closed → the queue closed and drained → flush → uploads within the budget →
    spill to the DLQ → 0.
    """
    lifecycle = Lifecycle(settings)
    metrics = metrics or Metrics()
    pipeline = _pipeline(settings, metrics, sinks, worker, dlq_root)
    collector = Collector(settings, pipeline.queue, metrics)
    front = make_front(settings, collector, metrics, lifecycle)
    loop = asyncio.get_running_loop()

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

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
    await pipeline.start()  # sinks, DLQ, replayers
    collector.accepting = True
    try:
        own_sock = sock or make_socket(settings.http_host, settings.http_port)
        await front.start(own_sock)
        _set_ready(collector, metrics, True)
        host, port = own_sock.getsockname()[:2]
        log.info("listening", extra={"addr": f"{host}:{port}", "sinks": list(settings.sinks),
                                     "dlq_dir": pipeline.dlq_root, "instance": pipeline.namer.instance,
                                     "http_front": settings.http_front})

        await lifecycle.wait_for_stop(shutdown_trigger)
        _set_ready(collector, metrics, False)
        await front.stop_listening()
        await _wait_in_flight(collector, lifecycle)
        await front.close()
    finally:
        # only now, with the HTTP side stopped, is the queue closed: no handler meets it closed
        collector.accepting = False
        await _drain(pipeline, lifecycle)
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return 0


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
