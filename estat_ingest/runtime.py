"""The event-loop runner shared by `serve` and each `serve --workers N` worker: uvloop when it is
installed, asyncio's own loop otherwise; and the cyclic GC's settings once such a server listens."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop missing on this platform
        return asyncio.run(coro)
    return uvloop.run(coro)


# The cyclic GC's first threshold for a serving process (CPython's default: 700). A gen-0 collection
# runs whenever tracked allocations outnumber deallocations by it, and the pipeline's holdings rise
# and fall by hundreds of records per request (a record is a tracked tuple until a collection
# untracks it): NDJSON at 64 connections ran 1,256 gen-0 collections in 10 s (243 ms), 114 gen-1
# (50 ms) and 4 full ones (123 ms), ~4% of the core; at 10,000 (with `gc.freeze`) 7-40 and 0 full
# ones, 18-36 ms in all. Cyclic garbage waits at most this many container objects longer: a few MB.
GC_GEN0 = 10_000


def settle_gc() -> None:
    """Once start-up is done (imports, botocore's models, the sinks): what it built is moved out of
    the collector's reach (`gc.freeze`: never garbage, so full collections no longer walk it), and
    gen-0 collections wait for GC_GEN0 net allocations. For processes that serve (app.serve with
    `settle_gc`), not for code that only embeds `serve` (the tests)."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, gen1, gen2)
