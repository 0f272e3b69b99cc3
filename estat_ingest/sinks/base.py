"""The sink seam: one required method, `send`, making ONE delivery attempt.

A sink classifies the outcome (ok / retry / reject, with a bounded reason) and never sleeps; the
engine owns retries, backoff, timeouts and the DLQ (Fluent Bit's OK/RETRY/ERROR, httpx's
transport). `Payload` is what a batch becomes: its name and partition are fixed when the batch
closes and never change, so every retry and every DLQ replay goes to the same key (§2.4).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace


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

    def with_attempts(self, attempts: int) -> Payload:
        return replace(self, attempts=attempts)


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str = ""  # bounded label: throttled, timeout, server_error, client_error, connection …
    remainder: Payload | None = None  # partial failure: only what is worth retrying
    rejected: Payload | None = None  # partial failure: items rejected for good (→ DLQ rejected/)
    delivered: int | None = None  # events delivered by this attempt when not all of them

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


OK = Result(Outcome.OK)


class Sink(ABC):
    name: str = "sink"
    #: attempts per payload before it goes to the DLQ (1 = no retry)
    attempts: int = 3
    #: bound on one attempt, enforced by the engine
    timeout_s: float = 10.0
    #: keep the uncompressed lines in Payload.lines (else only the compressed data is kept in memory)
    wants_lines: bool = False
    #: batching of this sink: (max events, max bytes, interval seconds); None = the global settings
    batching: tuple[int, int, float] | None = None

    async def start(self) -> None:
        """Open clients; called once before the first send."""

    @abstractmethod
    async def send(self, payload: Payload) -> Result:
        """ONE delivery attempt. Never sleeps, never retries."""

    async def check(self) -> None:
        """Start-up probe: log clearly if the destination is unreachable (never blocks readiness)."""

    async def aclose(self) -> None:
        """Release clients."""
