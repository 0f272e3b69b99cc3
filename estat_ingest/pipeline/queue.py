"""The bounded, closable queue between the HTTP handlers and the dispatcher.

Handlers never wait: `offer`/`offer_many` either take the item(s) or say no (→ 503). The
dispatcher is the only consumer. `close()` is called only after the HTTP server has stopped, so no
handler ever meets a closed queue; a closed queue still hands out what it holds, then `None`.

Two bounds: `capacity` items waiting here, and a byte budget for the whole pipeline
(BUFFER_MAX_BYTES). Accepting an item charges `size(item) * weight` bytes (weight = the number of
sinks holding the line); the engine gives them back with `release` when a batch has been delivered
or spilled. The budget is checked before an offer, not against its size, so a request is refused
only while the pipeline already holds the budget: memory can pass it by at most one request, and
no request is too large to ever fit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class EventQueue(Generic[T]):
    def __init__(self, capacity: int, max_bytes: int | None = None,
                 size: Callable[[T], int] | None = None, weight: int = 1) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes if max_bytes is not None and size is not None else 1 << 62
        self.held_bytes = 0  # charged by offers (and `charge`), given back by `release`
        self.held_reason = ""  # why bytes are held that cannot drain now (the engine's): a 503's reason
        self._size = size
        self._weight = weight
        self._items: deque[T] = deque()
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._waiting = False  # the consumer waits on `_wakeup` (else an offer has nobody to wake)
        self._parked = False  # the consumer is inside `take`, waiting or woken but not yet running
        self._loop: asyncio.AbstractEventLoop | None = None  # the consumer's (get_running_loop is a getpid)
        # durable acknowledgements: a ticket is answered once every item offered before it is durable
        self._offered = 0  # items ever offered
        self._taken = 0  # items ever taken
        self._tickets: deque[tuple[int, asyncio.Future[None]]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def over_budget(self) -> bool:
        return self.held_bytes >= self.max_bytes

    def room(self) -> int:
        """Items an offer could add now; 0 when the byte budget is spent."""
        if self.held_bytes >= self.max_bytes:
            return 0
        return self.capacity - len(self._items)

    def offer(self, item: T, nbytes: int | None = None) -> bool:
        """`nbytes`: `size(item)` when the caller has it at hand (the hot path), else it is computed."""
        items = self._items
        if self._closed or len(items) >= self.capacity or self.held_bytes >= self.max_bytes:
            return False
        if self._size is not None:
            self.held_bytes += (self._size(item) if nbytes is None else nbytes) * self._weight
        items.append(item)
        self._offered += 1
        if self._waiting:
            self.wake()
        return True

    def offer_many(self, items: Sequence[T], nbytes: int | None = None) -> bool:
        """All or nothing. `nbytes`: the items' total size when the caller has it, as in `offer`."""
        if (self._closed or len(self._items) + len(items) > self.capacity
                or self.held_bytes >= self.max_bytes):
            return False
        if self._size is not None:
            self.held_bytes += (sum(map(self._size, items)) if nbytes is None else nbytes) * self._weight
        self._items.extend(items)
        self._offered += len(items)
        if self._waiting:
            self.wake()
        return True

    def ticket(self) -> asyncio.Future[None]:
        """A future for everything offered so far: the consumer resolves it (durable mode: once the
        spool round that covers those items has been fsynced) or fails it (503).

        While the last ticket's items are not all taken, it is extended to cover the new items and
        returned again: the requests of one loop iteration share one future (they are taken, made
        durable and answered together anyway)."""
        t = self._tickets
        if t and t[-1][0] > self._taken:
            shared = t[-1][1]
            if not shared.done():
                t[-1] = (self._offered, shared)
                return shared
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        t.append((self._offered, fut))
        return fut

    def take_tickets(self) -> list[asyncio.Future[None]]:
        """The tickets whose items have all been taken."""
        t, taken, out = self._tickets, self._taken, []
        while t and t[0][0] <= taken:
            out.append(t.popleft()[1])
        return out

    def release(self, nbytes: int) -> None:
        """Give back bytes charged by offers (a batch delivered or spilled)."""
        self.held_bytes -= nbytes

    def charge(self, nbytes: int) -> None:
        """Charge bytes held outside the queue to the budget: batches neither a sink nor the DLQ took
        (kept in memory by the engine), so the budget fills and offers fail while they are held."""
        self.held_bytes += nbytes

    def close(self) -> None:
        self._closed = True
        self.wake()

    def wake(self) -> None:
        """Wake the consumer now (it takes what is there, or [] — the dispatcher then checks its deadlines)."""
        self._waiting = False
        if self._wakeup is not None:
            self._wakeup.set()

    def snapshot(self) -> list[T]:
        """A copy of the items waiting, oldest first (tests, debugging)."""
        return list(self._items)

    async def take(self, max_items: int | None, timeout: float | None) -> list[T] | None:  # noqa: ASYNC109
        """Up to `max_items` items (None: all there are); [] when `timeout` passed first; None when
        closed and empty."""
        if not self._items:
            if self._closed:
                return None
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            wakeup = self._wakeup
            if wakeup is None:
                wakeup = self._wakeup = asyncio.Event()
            wakeup.clear()
            # a timer handle rather than asyncio.timeout (a context manager, a getpid and a
            # cancellation per wait): the consumer waits once per loop iteration under load
            timer = None if timeout is None else loop.call_later(timeout, wakeup.set)
            self._waiting = self._parked = True
            try:
                await wakeup.wait()
            finally:
                self._waiting = self._parked = False
                if timer is not None:
                    timer.cancel()
            if not self._items:
                return None if self._closed else []
        return self.take_now(max_items)

    @property
    def parked(self) -> bool:
        """The consumer waits inside `take` (or was woken and has not run yet): items taken with
        `take_now` meanwhile are simply not in what its `take` returns."""
        return self._parked

    def take_now(self, max_items: int | None = None) -> list[T]:
        """`take` without waiting: up to `max_items` items (None: all), maybe none."""
        items = self._items
        n = len(items) if max_items is None else min(max_items, len(items))
        if self._tickets:  # never split a ticketed request between two takes (durable mode)
            end = self._taken + n
            for seq, _ in self._tickets:
                if seq >= end:
                    n = seq - self._taken
                    break
        self._taken += n
        if n == len(items):  # everything (the dispatcher's usual take): one copy, no pop per item
            out = list(items)
            items.clear()
            return out
        popleft = items.popleft
        return [popleft() for _ in range(n)]
