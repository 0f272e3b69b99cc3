"""Delivery: the one place that makes attempts and decides what a sink's `Result` means.

Three callers share it: the engine's uploaders (fresh batches), the DLQ replayer (one attempt per
file per pass) and `estat-ingest dlq replay` (an operator's run). Each gets back a `Final` and
does only what is its own: the engine spills what is left to the DLQ, the replayer and the CLI
settle the DLQ file (dlq/settle.py).

- `attempt()`: ONE attempt under the sink's timeout, measured (`upload_attempts_total`,
  `upload_duration_seconds`), logged when it failed (with the sink's error text; during an outage
  one line per reason per `FAILURE_LOG_EVERY_S`, which counts the attempts it held back), reported
  to the sink (`Sink.observe`), and cancelled by `Abort` at shutdown (None then).
- `judge()` (pure): a Result becomes a `Verdict` — delivered / retry (the whole payload, or only
  the remainder) / rejected for good / outage (the destination refuses everything: expired
  credentials, a missing bucket; never a verdict about this batch) — with the events delivered and
  the items set aside on the way.
- `Delivery.run()`: the retry loop: up to `attempts` attempts with capped exponential backoff
  (`Backoff`), following remainders, stopping at once on a rejection or an outage.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from estat_ingest.log import RateLimitedLog
from estat_ingest.metrics import Metrics
from estat_ingest.sinks.base import Outcome, Payload, Result, Sink

log = logging.getLogger("estat_ingest.delivery")

@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with "equal jitter" (half fixed, half random)."""

    base_s: float = 0.2
    cap_s: float = 2.0

    def delay(self, failures: int, rand: random.Random | None = None) -> float:
        """Delay before the next attempt after `failures` consecutive failures (≥ 1)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(0, failures - 1))
        r: float = (rand or random).random()
        return ceiling / 2 + r * ceiling / 2  # never zero, never above the cap


class Next(enum.Enum):
    DELIVERED = "delivered"  # nothing left to send (items rejected for good may have been set aside)
    RETRY = "retry"  # send `Verdict.payload` again (the whole batch, or only the remainder)
    REJECTED = "rejected"  # the sink refused this batch for good: set it aside
    OUTAGE = "outage"  # the sink refuses everything right now: keep the batch, try later


@dataclass(frozen=True, slots=True)
class Verdict:
    next: Next
    reason: str
    payload: Payload  # what is left to deliver (the remainder when there is one)
    delivered: int  # events this attempt delivered
    rejected: Payload | None  # items rejected for good by this attempt, to be set aside


def judge(result: Result, payload: Payload) -> Verdict:
    """What happens next after one attempt: the only interpreter of a sink's Result."""
    if result.ok:
        n = payload.num_events if result.delivered is None else result.delivered
        return Verdict(Next.DELIVERED, result.reason, payload, n, result.rejected)
    left = payload if result.remainder is None else result.remainder.with_attempts(payload.attempts)
    if result.outage:  # the sink says the destination refuses everything: never this batch's fault
        nxt = Next.OUTAGE
    elif result.outcome is Outcome.REJECT:
        nxt = Next.REJECTED
    else:
        nxt = Next.RETRY
    return Verdict(nxt, result.reason or result.outcome.value, left, result.delivered or 0, result.rejected)


@dataclass(slots=True)
class Final:
    """Where a run ended: `next` is DELIVERED, REJECTED, OUTAGE, RETRY (attempts exhausted) or None
    (aborted by shutdown)."""

    next: Next | None
    reason: str
    payload: Payload  # what is left (after remainders), with its attempt count
    delivered: int = 0  # events delivered over the run
    set_aside: list[Payload] = field(default_factory=list)  # items rejected for good on the way
    attempts: int = 0  # attempts this run made

    @property
    def changed(self) -> bool:
        """Part of the batch was delivered or set aside: a stored copy must shrink to `payload`."""
        return self.next is not Next.DELIVERED and (self.delivered > 0 or bool(self.set_aside))


class Abort:
    """The second phase of shutdown: attempts in flight are cancelled, no new one starts."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._attempting: set[asyncio.Task[Any]] = set()
        self._cancelled: set[asyncio.Task[Any]] = set()

    def is_set(self) -> bool:
        return self.event.is_set()

    @property
    def attempting(self) -> int:
        """Attempts in flight (tasks inside `Delivery.attempt`)."""
        return len(self._attempting)

    @property
    def unconsumed(self) -> int:
        """Cancels sent by `set()` that no attempt has consumed yet (0 once every attempt returned)."""
        return len(self._cancelled)

    def enter(self, task: asyncio.Task[Any]) -> None:
        self._attempting.add(task)

    def cancelled(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task`'s cancellation came from this abort (not from its caller)."""
        return task in self._cancelled

    def leave(self, task: asyncio.Task[Any]) -> None:
        """The attempt is over: an abort's cancel is consumed (caught, or swallowed by the sink)."""
        self._attempting.discard(task)
        if task in self._cancelled:
            self._cancelled.discard(task)
            task.uncancel()

    def set(self) -> None:
        self.event.set()
        for task in self._attempting - self._cancelled:
            self._cancelled.add(task)
            task.cancel()

    async def sleep(self, delay: float) -> bool:
        """Sleep `delay`; True if the abort came first."""
        try:
            async with asyncio.timeout(delay):
                await self.event.wait()
        except TimeoutError:
            return False
        return True


# A sink that is down fails every attempt of every batch, fresh and replayed: one line per reason
# per interval says so as well as one per attempt, and the metrics count each attempt anyway.
FAILURE_LOG_EVERY_S = 10.0


class Delivery:
    """Attempts to one sink, with its spec's timeout and attempts, counted in `metrics`."""

    def __init__(self, sink: Sink, metrics: Metrics, *, backoff: Backoff | None = None,
                 abort: Abort | None = None, failure_log: RateLimitedLog | None = None) -> None:
        self.sink = sink
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.abort = abort or Abort()
        self.failure_log = failure_log or RateLimitedLog(FAILURE_LOG_EVERY_S)
        self._duration = metrics.upload_duration
        self._attempts = metrics.upload_attempts

    async def attempt(self, payload: Payload) -> Result | None:
        """One attempt under the sink's timeout; None when aborted by shutdown mid-attempt."""
        # The send runs inline in the caller's task (no task of its own, no asyncio.wait): each extra
        # hop costs a loop iteration, which is long when the loop is saturated. `Abort.set()`
        # cancels the attempting tasks; that cancel is recognised here and consumed.
        abort = self.abort
        if abort.is_set():
            return None
        sink = self.sink
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        t0 = loop.time()
        abort.enter(task)
        try:
            async with asyncio.timeout(sink.spec.timeout_s):
                result = await sink.send(payload)
        except TimeoutError:
            result = Result(Outcome.RETRY, "timeout", error=f"no answer within {sink.spec.timeout_s:g}s")
        except asyncio.CancelledError:
            if not abort.cancelled(task):
                raise  # our caller was cancelled: the attempt goes with it
            return None
        except Exception as err:
            log.error("sink raised instead of returning a Result", exc_info=err, extra={"sink": sink.name})
            result = Result(Outcome.RETRY, "error", error=f"{type(err).__name__}: {err}"[:300])
        finally:
            abort.leave(task)
        outcome = result.outcome.value
        self._duration.labels(sink.name, outcome).observe(loop.time() - t0)
        self._attempts.labels(sink.name, outcome, result.reason or outcome).inc()
        sink.observe(payload, result)
        if not result.ok:
            self._log_failure(payload, result)
        return result

    def _log_failure(self, payload: Payload, result: Result) -> None:
        """One line for the first failure of a reason, then at most one per interval, saying how
        many failed attempts of that reason it did not log (`suppressed`)."""
        reason = result.reason or result.outcome.value
        suppressed = self.failure_log.allow(f"{self.sink.name}:{reason}")
        if suppressed is None:
            return
        log.warning("delivery attempt failed", extra={
            "sink": self.sink.name, "batch": payload.name, "events": payload.num_events,
            "outcome": result.outcome.value, "reason": reason, "attempt": payload.attempts + 1,
            "error": result.error or reason, "suppressed": suppressed})

    async def run(self, payload: Payload, attempts: int | None = None) -> Final:
        """Attempts with backoff until delivered, rejected, an outage, `attempts` failures (default:
        the sink's spec) or an abort."""
        limit = self.sink.spec.attempts if attempts is None else max(1, attempts)
        final = Final(None, "shutdown", payload)
        failures = 0
        while True:
            result = await self.attempt(final.payload)
            if result is None:
                final.next, final.reason = None, "shutdown"
                return final
            final.attempts += 1
            verdict = judge(result, final.payload.with_attempts(final.payload.attempts + 1))
            final.payload = verdict.payload
            final.delivered += verdict.delivered
            if verdict.rejected is not None:
                final.set_aside.append(verdict.rejected)
            final.next, final.reason = verdict.next, verdict.reason
            if verdict.next is not Next.RETRY:
                return final
            failures += 1
            if failures >= limit:
                return final
            if await self.abort.sleep(self.backoff.delay(failures)):
                final.next, final.reason = None, "shutdown"
                return final
