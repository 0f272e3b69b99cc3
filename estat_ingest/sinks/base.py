"""The sink seam: a declared spec and one required method, `send`, making ONE delivery attempt.

A sink states what the engine needs to know about it in a frozen `SinkSpec` (attempts, the bound
on one attempt, batching, concurrency, whether it wants the uncompressed lines), classifies each
attempt's outcome (ok / retry / reject, with a bounded reason) and never sleeps: the delivery
module (`estat_ingest/delivery.py`) owns retries, backoff, timeouts and what an outcome means
(Fluent Bit's OK/RETRY/ERROR, httpx's transport). Optional abilities are small Protocols
(`KeepsRejects`), checked by mypy, never discovered with getattr.

A failed Result also says what it is about: this batch (its own 4xx, a mapping error: the batch
may be set aside) or, with `outage=True`, the whole destination (a missing bucket, refused or
expired credentials, a closed or blocked index: nothing is wrong with the batch, it is kept and
retried later). Each sink decides this from its own error codes; only the delivery module reads it.

`Payload` is what a batch becomes: its name and partition are fixed when the batch closes and
never change, so every retry and every DLQ replay goes to the same key (§2.4).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Payload:
    name: str  # <unix>_<instance>_<counter>.jsonl.gz — also the DLQ file name
    partition: str  # dt=YYYY-MM-DD/hr=HH
    num_events: int
    data: bytes  # compressed JSONL: the S3 object, the file, the DLQ file (byte-identical)
    compression: str  # gzip | zstd
    first_ts: float
    lines: tuple[bytes, ...] | None = None  # uncompressed lines when known (fresh batches)
    attempts: int = 0  # delivery attempts so far, over the payload's whole life
    meta: dict[str, object] = field(default_factory=dict)  # extra DLQ metadata (e.g. item errors)
    replayed: bool = False  # read back from a DLQ file (not a fresh batch)
    file: str | None = None  # a spool file holding exactly `data`: the DLQ takes it by rename

    def with_attempts(self, attempts: int) -> Payload:
        return replace(self, attempts=attempts)


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str = ""  # bounded label: throttled, timeout, server_error, client_error, connection …
    remainder: Payload | None = None  # partial failure: only what is worth retrying
    rejected: Payload | None = None  # partial failure: items rejected for good (→ set aside)
    delivered: int | None = None  # events delivered by this attempt when not all of them
    error: str = ""  # the error text for the log line (never a label: unbounded)
    # the destination refuses everything right now (NoSuchBucket, AccessDenied, expired token,
    # OpenSearch 401/403, index closed, cluster block): never a verdict about this batch
    outage: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


OK = Result(Outcome.OK)


def outage(reason: str, outcome: Outcome = Outcome.REJECT, error: str = "") -> Result:
    """A failure about the whole destination, not this batch (`Result.outage`)."""
    return Result(outcome, reason, error=error, outage=True)


@dataclass(frozen=True, slots=True)
class Batching:
    """A batch closes at whichever comes first."""

    max_events: int
    max_bytes: int
    interval_s: float


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """What the engine, the replayer and `dlq replay` need to know about a sink."""

    name: str  # metric label and DLQ subdirectory
    attempts: int  # attempts per payload before it goes to the DLQ (1 = no retry)
    timeout_s: float  # bound on one attempt, enforced by the delivery module
    batching: Batching | None = None  # None: the global BATCH_SIZE / BATCH_MAX_BYTES / FLUSH_INTERVAL
    concurrency: int | None = None  # uploads in flight; None: UPLOAD_CONCURRENCY
    keeps_lines: bool = False  # keep the uncompressed lines in Payload.lines (else only the data)
    reads_v1_dlq: bool = False  # v1's DLQ files (directly in DLQ_DIR) belong to this sink

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.timeout_s <= 0:
            raise ValueError(f"sink {self.name}: attempts must be >= 1 and timeout_s > 0")


@dataclass(frozen=True, slots=True)
class Probe:
    """What `Sink.probe` found: one line per problem (none: the sink can take batches) and what was
    tried, for the ok line. Neither ever holds a secret."""

    checked: str
    problems: tuple[str, ...] = ()


class Sink(ABC):
    """One destination. Besides `send`, every sink can be probed for `validate --check-sinks`
    (`probe`) and names where a payload goes for an operator (`target_of`)."""

    spec: SinkSpec  # set by the constructor

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        """Open clients; called once before the first send."""

    @abstractmethod
    async def send(self, payload: Payload) -> Result:
        """ONE delivery attempt. Never sleeps, never retries."""

    def observe(self, payload: Payload, result: Result) -> None:
        """After every attempt (fresh or replayed, also a timed-out one): metrics the sink owns."""

    async def check(self) -> None:
        """Start-up probe: log clearly if the destination is unreachable (never blocks readiness)."""

    def target_of(self, payload: Payload) -> str:
        """Where `payload` goes, in the words of the destination (`dlq replay --dry-run`)."""
        return f"{self.name} {payload.partition}/{payload.name}"

    async def probe(self) -> Probe:
        """`estat-ingest validate --check-sinks`: try the destination the way a batch would, with
        the real settings and credentials, and say what keeps it from working. Called after
        `start()`; never raises; the caller bounds its time."""
        return Probe("nothing to check")

    async def aclose(self) -> None:
        """Release clients."""


@runtime_checkable
class KeepsRejects(Protocol):
    """A sink with a place of its own for batches it rejected for good (S3: under DLQ_PREFIX)."""

    async def keep_rejected(self, payload: Payload) -> str | None:
        """Store `payload` there; its location, or None if that failed (it is then moved aside
        locally). One attempt, bounded by the sink's own timeout."""
