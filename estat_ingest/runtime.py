"""The event-loop runner shared by `serve` and each `serve --workers N` worker: uvloop when it is
installed, asyncio's own loop otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop missing on this platform
        return asyncio.run(coro)
    return uvloop.run(coro)
