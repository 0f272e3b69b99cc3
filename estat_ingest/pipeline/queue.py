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

    def offer(self, item: T) -> bool:
        if self._closed or len(self._items) >= self.capacity or self.held_bytes >= self.max_bytes:
            return False
        if self._size is not None:
            self.held_bytes += self._size(item) * self._weight
        self._items.append(item)
        self._offered += 1
        self.wake()
        return True

    def offer_many(self, items: Sequence[T]) -> bool:
        """All or nothing."""
        if (self._closed or len(self._items) + len(items) > self.capacity
                or self.held_bytes >= self.max_bytes):
            return False
        if self._size is not None:
            self.held_bytes += sum(map(self._size, items)) * self._weight
        self._items.extend(items)
        self._offered += len(items)
        self.wake()
        return True

    def ticket(self) -> asyncio.Future[None]:
        """A future for everything offered so far: the consumer resolves it (durable mode: once the
        spool round that covers those items has been fsynced) or fails it (503)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tickets.append((self._offered, fut))
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
        if self._wakeup is not None:
            self._wakeup.set()

    def snapshot(self) -> list[T]:
        """A copy of the items waiting, oldest first (tests, debugging)."""
        return list(self._items)

    async def take(self, max_items: int, timeout: float | None) -> list[T] | None:  # noqa: ASYNC109
        """Up to `max_items` items; [] when `timeout` passed first; None when closed and empty."""
        if not self._items:
            if self._closed:
                return None
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            self._wakeup.clear()
            if timeout is None:
                await self._wakeup.wait()
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    return []
            if not self._items:
                return None if self._closed else []
        items = self._items
        n = min(max_items, len(items))
        if self._tickets:  # never split a ticketed request between two takes (durable mode)
            end = self._taken + n
            for seq, _ in self._tickets:
                if seq >= end:
                    n = seq - self._taken
                    break
        self._taken += n
        popleft = items.popleft
        return [popleft() for _ in range(n)]
