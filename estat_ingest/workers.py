"""`serve --workers N`: N worker processes on one port (SO_REUSEPORT), one parent supervising them.

Invariants
- Each worker is a full server (`app.serve`) with its own pipeline, its own DLQ subdirectory
  (`dlq_root_for(settings, index)` → `DLQ_DIR/w<index>`) and its own `Namer` (`<instance>-w<index>-
  <random>`), so object and DLQ names never collide between workers or across restarts.
- Workers are started with `spawn` (a fresh interpreter: no forked event loop, no shared locks) and
  each binds its own socket with SO_REUSEPORT; the kernel spreads new connections over the sockets
  that are listening. A worker's socket starts listening only when its server is ready, so no
  connection waits in the backlog of a worker that is still starting.
- Workers run in their own process group: a terminal's ^C reaches the parent only, and the parent
  forwards exactly one SIGTERM per signal it gets (the second one makes workers spill at once,
  DESIGN.md §7). A worker whose parent dies gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and
  drains as usual.
- Before the first signal, a worker that exits for any reason is logged and restarted (with a
  growing delay if it keeps dying). After it, nothing is restarted; the parent exits 0 only when
  every worker exited 0 (drained), 1 otherwise. A worker that outlives SHUTDOWN_TIMEOUT by the
  grace margin is killed and the parent exits 1.
- /metrics reports the whole group, merged by the parent (groupmetrics.py) over unix sockets in a
  run directory it creates and removes. The parent's asyncio side (`_GroupMetrics`: that merge and,
  with METRICS_ADDR, the metrics listener) runs in a thread of its own with the stop signals
  blocked, so the supervising loop below stays a blocking wait on its children and its wake-up fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING

from estat_ingest.config import Settings
from estat_ingest.groupmetrics import Aggregator, GroupLink, make_run_dir, remove_run_dir
from estat_ingest.sockets import make_socket

if TYPE_CHECKING:
    from estat_ingest.http.metrics_listener import MetricsListener

log = logging.getLogger("estat_ingest.workers")

RESTART_DELAY_MIN_S = 0.5
RESTART_DELAY_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a worker that lived this long resets its restart delay
KILL_GRACE_S = 10.0  # beyond SHUTDOWN_TIMEOUT before a stuck worker is killed

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _die_with_parent() -> None:
    """Linux only: SIGTERM this process when its parent dies, so an orphan drains and exits."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class _EarlyStop:
    """A signal that arrives while the worker starts, before `serve` has its own handlers (sinks
    are imported and built first), must still mean "drain", not the default "die"."""

    def __init__(self) -> None:
        self.signals = 0
        self.trigger: asyncio.Event | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.trigger is not None:
            self.trigger.set()  # nothing awaits it yet: this only sets its flag

    async def serve(self, settings: Settings, index: int, sock: socket.socket, link: GroupLink) -> int:
        from estat_ingest.app import serve
        from estat_ingest.pipeline.engine import dlq_root_for

        self.trigger = asyncio.Event()
        if self.signals:
            self.trigger.set()
        return await serve(settings, worker=index, dlq_root=dlq_root_for(settings, index), sock=sock,
                           group=link, shutdown_trigger=self.trigger, settle_gc=True)


def worker_main(settings: Settings, index: int, link: GroupLink) -> None:
    """Entry point of one worker process (runs in a freshly spawned interpreter)."""
    early = _EarlyStop()
    for sig in STOP_SIGNALS:
        signal.signal(sig, early)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent until now
    os.setpgid(0, 0)
    _die_with_parent()
    from estat_ingest import log as logsetup
    from estat_ingest.runtime import run

    logsetup.setup(settings.log_level, settings.log_format, redact=settings.secret_values(),
                   service="estat-ingest", instance=settings.instance_id, worker=index)
    sock = make_socket(settings.http_host, settings.http_port, reuse_port=True, listen=False)
    code = run(early.serve(settings, index, sock, link))
    sys.exit(code)


@dataclasses.dataclass
class _Slot:
    index: int
    proc: BaseProcess | None = None
    started_at: float = 0.0
    delay_s: float = RESTART_DELAY_MIN_S
    restart_at: float | None = None  # monotonic time of a pending restart
    exitcode: int | None = None


class _GroupMetrics(threading.Thread):
    """The parent's event loop: the group's metrics merge on `parent.sock` and, with METRICS_ADDR,
    the listener for /metrics (the group's), /health and /ready (200 while at least one worker is
    ready and no stop signal came: what the shared port offers a load balancer)."""

    def __init__(self, link: GroupLink, metrics_sock: socket.socket | None, stopping: threading.Event) -> None:
        super().__init__(name="estat-ingest-group-metrics", daemon=True)
        self.link = link
        self.metrics_sock = metrics_sock
        self.stopping = stopping
        self.started_up = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quit: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._quit = asyncio.get_running_loop(), asyncio.Event()
        aggregator = Aggregator(self.link)
        listener = None
        try:
            await aggregator.start()
            if self.metrics_sock is not None:
                listener = await self._listen(aggregator, self.metrics_sock)
        except Exception:  # the workers still serve; their /metrics answers 503 without the parent
            log.exception("group metrics could not start")
        finally:
            self.started_up.set()
        try:
            await self._quit.wait()
        finally:
            if listener is not None:
                await listener.close()
            await aggregator.close()

    async def _listen(self, aggregator: Aggregator, sock: socket.socket) -> MetricsListener:
        from estat_ingest.http.metrics_listener import MetricsListener
        from estat_ingest.http.policy import Reply
        from estat_ingest.metrics import CONTENT_TYPE

        async def scrape() -> Reply:
            return Reply(200, {"Content-Type": CONTENT_TYPE}, await aggregator.render())

        async def ready() -> bool:
            return not self.stopping.is_set() and await aggregator.ready_workers() > 0

        listener = MetricsListener(scrape, ready)
        await listener.start(sock)
        return listener

    def stop(self) -> None:
        loop, quit_ = self._loop, self._quit
        if loop is not None and quit_ is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(quit_.set)
        self.join(5)


class Supervisor:
    def __init__(self, settings: Settings, link: GroupLink, metrics_sock: socket.socket | None = None) -> None:
        self.settings = settings
        self.link = link
        self.metrics_sock = metrics_sock
        self.stopping = threading.Event()  # the first signal came (the metrics listener's /ready: 503)
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self.signals = 0
        self.stop_deadline: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------------ processes

    def _start(self, slot: _Slot) -> None:
        proc = self.ctx.Process(target=worker_main, args=(self.settings, slot.index, self.link),
                                name=f"estat-ingest-w{slot.index}")
        # The child inherits a mask that blocks SIGTERM/SIGINT until worker_main has its handler:
        # a signal forwarded while the new interpreter is still starting waits instead of killing.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        slot.proc, slot.started_at, slot.restart_at, slot.exitcode = proc, time.monotonic(), None, None
        log.info("worker started", extra={"worker": slot.index, "pid": proc.pid})

    def _alive(self) -> list[_Slot]:
        return [s for s in self.slots if s.proc is not None and s.exitcode is None]

    def _forward(self) -> None:
        for slot in self._alive():
            assert slot.proc is not None and slot.proc.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.proc.pid, signal.SIGTERM)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1  # the loop notices through the wake-up fd

    def _install(self) -> dict[int, object]:
        old: dict[int, object] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        return old

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        # multiprocessing starts its resource tracker on the first spawn and, doing so, UNBLOCKS
        # SIGTERM/SIGINT (resource_tracker.ensure_running): start it before we block them.
        multiprocessing.resource_tracker.ensure_running()
        group = _GroupMetrics(self.link, self.metrics_sock, self.stopping)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the thread never takes them
        try:
            group.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        group.started_up.wait(10)
        old = self._install()
        handled = 0
        try:
            for slot in self.slots:
                self._start(slot)
            while True:
                if self.signals > handled:
                    if handled == 0:
                        log.info("signal received: draining every worker",
                                 extra={"workers": len(self._alive()),
                                        "budget_seconds": self.settings.shutdown_timeout_s})
                        budget = self.settings.shutdown_timeout_s + KILL_GRACE_S
                        self.stop_deadline = time.monotonic() + budget
                        self.stopping.set()
                    else:
                        log.warning("second signal: workers spill to the dlq now")
                    handled = self.signals
                    self._forward()
                if self.stop_deadline is not None and not self._alive():
                    break
                self._wait()
                self._reap()
                if self.stop_deadline is None:
                    self._restart_due()
                elif time.monotonic() > self.stop_deadline:
                    for slot in self._alive():
                        assert slot.proc is not None
                        log.error("worker did not drain in time: killed", extra={"worker": slot.index})
                        slot.proc.kill()
                        slot.proc.join(5)
                        slot.exitcode = slot.proc.exitcode if slot.proc.exitcode is not None else -9
                    break
        finally:
            signal.set_wakeup_fd(-1)
            for sig, handler in old.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            self._wake_r.close()
            self._wake_w.close()
            group.stop()
        codes = {str(s.index): s.exitcode for s in self.slots}
        ok = all(c == 0 for c in codes.values())
        log.info("all workers stopped", extra={"exit_codes": codes, "ok": ok})
        return 0 if ok else 1

    def _wait(self) -> None:
        now = time.monotonic()
        timeouts = [s.restart_at - now for s in self.slots if s.restart_at is not None]
        if self.stop_deadline is not None:
            timeouts.append(self.stop_deadline - now)
        timeout = max(0.0, min(timeouts)) if timeouts else None
        waitables: list[object] = [self._wake_r]
        waitables += [s.proc.sentinel for s in self._alive() if s.proc is not None]
        multiprocessing.connection.wait(waitables, timeout)  # type: ignore[arg-type]
        self._drain_wakeups()

    def _reap(self) -> None:
        for slot in self._alive():
            assert slot.proc is not None
            if slot.proc.is_alive():
                continue
            slot.proc.join()
            slot.exitcode = slot.proc.exitcode
            if self.stop_deadline is not None:
                log.info("worker stopped", extra={"worker": slot.index, "exit_code": slot.exitcode})
                continue
            lived = time.monotonic() - slot.started_at
            if lived >= STABLE_AFTER_S:
                slot.delay_s = RESTART_DELAY_MIN_S
            slot.restart_at = time.monotonic() + slot.delay_s
            log.error("worker died unexpectedly: restarting", extra={
                "worker": slot.index, "exit_code": slot.exitcode, "lived_seconds": round(lived, 3),
                "restart_in_seconds": slot.delay_s})
            slot.delay_s = min(RESTART_DELAY_MAX_S, slot.delay_s * 2)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)


def run_workers(settings: Settings, holder: socket.socket | None = None,
                metrics_sock: socket.socket | None = None) -> int:
    """Run `settings.workers` server processes on one port until SIGTERM/SIGINT; the exit code.
    `holder`: the port, already bound with SO_REUSEPORT (the CLI binds it before anything starts,
    so a port in use is one line, not a traceback); `metrics_sock`: METRICS_ADDR, bound, served
    by this process. Both closed on return."""
    # Port 0 means "any": pick it once here so every worker binds the same one. The parent keeps
    # its socket bound (never listening) so the port stays ours while workers restart.
    if holder is None:
        holder = make_socket(settings.http_host, settings.http_port, reuse_port=True, listen=False)
    if metrics_sock is None and settings.metrics_host:
        try:
            metrics_sock = make_socket(settings.metrics_host, settings.metrics_port, listen=False)
        except BaseException:
            holder.close()
            raise
    link = GroupLink(make_run_dir(), settings.workers)
    try:
        port = holder.getsockname()[1]
        settings = dataclasses.replace(settings, http_port=port)
        extra: dict[str, object] = {"workers": settings.workers, "addr": f"{settings.http_host}:{port}",
                                    "run_dir": link.run_dir}
        if metrics_sock is not None:
            mhost, mport = metrics_sock.getsockname()[:2]
            extra["metrics_addr"] = f"{mhost}:{mport}"
        log.info("starting workers", extra=extra)
        return Supervisor(settings, link, metrics_sock).run()
    finally:
        holder.close()
        if metrics_sock is not None:
            metrics_sock.close()
        remove_run_dir(link.run_dir)
