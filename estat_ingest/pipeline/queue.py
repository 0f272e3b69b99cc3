"""The bounded, closable queue between the HTTP handlers and the dispatcher.

Handlers never wait: `offer`/`offer_many` either take the item(s) or say no (→ 503). The
dispatcher is the only consumer. `close()` is called only after the HTTP server has stopped, so no
handler ever meets a closed queue; a closed queue still hands out what it holds, then `None`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class EventQueue(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._closed = False
        self._wakeup: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def room(self) -> int:
        return self.capacity - len(self._items)

    def offer(self, item: T) -> bool:
        if self._closed or len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        self._wake()
        return True

    def offer_many(self, items: Sequence[T]) -> bool:
        """All or nothing."""
        if self._closed or len(self._items) + len(items) > self.capacity:
            return False
        self._items.extend(items)
        self._wake()
        return True

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

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
        popleft = items.popleft
        return [popleft() for _ in range(n)]
