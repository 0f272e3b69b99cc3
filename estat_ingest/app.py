"""Wiring: create_app(settings) → aiohttp Application, and serve() with the shutdown order.

Shutdown (DESIGN.md §7), owned by aiohttp's runner: the first signal turns /ready 503 → the
runner stops the listener and waits (bounded) for in-flight requests → the app's cleanup_ctx
drains the pipeline with what is left of SHUTDOWN_TIMEOUT → undelivered batches go to the DLQ →
exit 0. The queue is closed only in cleanup, after the HTTP side has fully stopped, so no handler
ever meets a closed queue. A second signal skips straight to the spill.
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
from estat_ingest.http.routes import COLLECTOR, GUARD, METRICS, add_routes, server_kwargs
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks import build_sink
from estat_ingest.sinks.base import Sink

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
    metrics = metrics or Metrics()
    lifecycle = lifecycle or Lifecycle(settings)
    pipeline = Pipeline(
        settings,
        metrics,
        list(sinks) if sinks is not None else [build_sink(n, settings) for n in settings.sinks],
        worker=worker,
        dlq_root=dlq_root,
    )
    collector = Collector(settings, pipeline.queue, metrics)
    app = web.Application()
    app[COLLECTOR] = collector
    app[METRICS] = metrics
    app[PIPELINE] = pipeline
    add_routes(app)

    async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
        await pipeline.start()
        collector.accepting = True
        yield
        collector.accepting = False
        t0 = time.monotonic()
        report = await pipeline.drain(lifecycle.delivery_budget())
        log.info("shutdown complete", extra={
            "delivered_events": report.delivered_events, "spilled_events": report.spilled_events,
            "lost_events": report.lost_events, "aborted": report.aborted,
            "drain_seconds": round(time.monotonic() - t0, 3)})

    app.cleanup_ctx.append(pipeline_ctx)
    return app


def set_ready(app: web.Application, ready: bool) -> None:
    app[COLLECTOR].ready = ready
    app[METRICS].ready.set(1 if ready else 0)


def make_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


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
    """Run until SIGTERM/SIGINT (or `shutdown_trigger`), drain, return the exit code."""
    lifecycle = Lifecycle(settings)
    app = create_app(settings, metrics=metrics, sinks=sinks, lifecycle=lifecycle, worker=worker, dlq_root=dlq_root)
    pipeline = app[PIPELINE]
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if lifecycle.started_at is None:
            log.info("signal received: draining", extra={"signal": signame,
                                                         "budget_seconds": settings.shutdown_timeout_s})
            lifecycle.begin()
            set_ready(app, False)
        else:
            log.warning("second signal: spilling to the dlq now", extra={"signal": signame})
            lifecycle.hurry.set()
            pipeline.abort()

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)

    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=lifecycle.http_grace(),
        **server_kwargs(app),  # header limits, auto_decompress off, keep-alive 75 s (> ALB's 60 s)
    )
    await runner.setup()  # runs cleanup_ctx start-up: sinks, DLQ, pipeline
    app[GUARD].attach(runner.server)  # header-read deadline sweeps the server's connections
    own_sock = sock or make_socket(settings.http_host, settings.http_port)
    site = web.SockSite(runner, own_sock)
    await site.start()
    set_ready(app, True)
    host, port = own_sock.getsockname()[:2]
    log.info("listening", extra={"addr": f"{host}:{port}", "sinks": list(settings.sinks),
                                 "dlq_dir": pipeline.dlq_root, "instance": pipeline.namer.instance})

    await lifecycle.wait_for_stop(shutdown_trigger)
    set_ready(app, False)
    # Stop listening, then let requests already inside /collect finish (slow bodies included):
    # aiohttp's own shutdown ignores bytes that arrive after it starts, which would cut them off.
    await site.stop()
    collector = app[COLLECTOR]
    drained = asyncio.ensure_future(collector.inflight.wait_zero(lifecycle.http_grace()))
    hurry = asyncio.ensure_future(lifecycle.hurry.wait())
    await asyncio.wait({drained, hurry}, return_when=asyncio.FIRST_COMPLETED)
    hurry.cancel()
    if not drained.done():
        drained.cancel()
    if collector.inflight.count:
        log.warning("in-flight requests still open after the grace period", extra={
            "requests": collector.inflight.count})
    await runner.cleanup()  # idle connections closed → pipeline drained (cleanup_ctx)
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
