"""Batching (pure: no I/O, no clock of its own — the caller passes `now`).

A batch closes at `max_events`, at `max_bytes` of JSONL, or `interval_s` after its FIRST event,
whichever comes first. The deadline belongs to the open batch and is recomputed for every new
batch, so an idle period can never switch the timer off (v1 defect §9 e).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any


@dataclass(slots=True)
class Batch:
    lines: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    first_ts: float = 0.0  # receive time (epoch s) of the first event → partition and name
    spool: Any = None  # ACK_MODE=durable: the batch's spool file and members (spool/writer.py)

    def __len__(self) -> int:
        return len(self.lines)


class Batcher:
    __slots__ = ("_batch", "deadline", "interval_s", "max_bytes", "max_events")

    def __init__(self, max_events: int, max_bytes: int, interval_s: float) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.interval_s = interval_s
        self._batch: Batch | None = None
        self.deadline: float | None = None  # monotonic time at which the open batch is due

    def add(self, ts: float, line: bytes, now: float) -> Batch | None:
        """Add one record; return the batch if this record closed it."""
        b = self._batch
        if b is None:
            b = self._batch = Batch(first_ts=ts)
            self.deadline = now + self.interval_s
        elif b.nbytes + len(line) > self.max_bytes and b.lines:
            # the record would overflow the byte cap: close what we have, start anew with it
            closed = self.take()
            b = self._batch = Batch(first_ts=ts)
            self.deadline = now + self.interval_s
            b.lines.append(line)
            b.nbytes += len(line)
            if len(b.lines) >= self.max_events or b.nbytes >= self.max_bytes:
                # cannot return two batches; the caller sees the second one on its next add/due
                self.deadline = now
            return closed
        b.lines.append(line)
        b.nbytes += len(line)
        if len(b.lines) >= self.max_events or b.nbytes >= self.max_bytes:
            return self.take()
        return None

    def add_many(self, items: Sequence[tuple[float, bytes]], now: float) -> list[Batch]:
        """`add` each record in order; return the batches they closed, in order (usually none).

        The common case, records that fit the open batch without reaching a limit, is one list
        extend and one byte sum instead of a call per record (the dispatcher's per-event cost).
        """
        closed: list[Batch] = []
        rest = items
        if self._batch is None and rest:  # the first record opens a batch (first_ts, deadline)
            ts, line = rest[0]
            c = self.add(ts, line, now)
            if c is not None:
                closed.append(c)
            rest = rest[1:]
        b = self._batch
        if b is not None and rest and len(b.lines) + len(rest) < self.max_events:
            lines = list(map(itemgetter(1), rest))
            nbytes = b.nbytes + sum(map(len, lines))
            if nbytes < self.max_bytes:
                b.lines += lines
                b.nbytes = nbytes
                return closed
        add = self.add
        for ts, line in rest:
            c = add(ts, line, now)
            if c is not None:
                closed.append(c)
        return closed

    def due(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def take(self) -> Batch | None:
        b, self._batch, self.deadline = self._batch, None, None
        return b if b else None

    @property
    def current(self) -> Batch | None:
        """The open batch, if any."""
        return self._batch

    @property
    def pending(self) -> int:
        return len(self._batch) if self._batch else 0

    @property
    def nbytes(self) -> int:
        """Bytes of JSONL in the open batch."""
        return self._batch.nbytes if self._batch else 0
