"""Records: one JSONL line per accepted event, encoded once, at accept time.

Field order is v1's (`ts, ip, user_agent, cookie, body`) plus `id`. orjson keeps dict insertion
order, and `body` is the client's payload as a JSON string, exactly as sent (DESIGN.md §3).
"""

from __future__ import annotations

import os
import time

import orjson


class IdGen:
    """Event ids: unique across instances and restarts, lexicographic order = receive order.

    `<12 hex: ms since epoch><12 hex: random per process><6 hex: counter>` — 30 characters.
    The time prefix orders ids across instances; the random middle makes two processes (or one
    restarted) distinct; the counter orders and separates ids within a millisecond.
    """

    __slots__ = ("_counter", "_last_ms", "_middle", "_prefix")

    def __init__(self) -> None:
        self._middle = os.urandom(6).hex()
        self._counter = 0
        self._last_ms = 0
        self._prefix = f"{0:012x}{self._middle}"

    def next(self, now: float) -> str:
        # Hot path (once per event): the time+random prefix is formatted only when the
        # millisecond changes (measured 0.74 µs → 0.37 µs per id). A clock that steps back keeps
        # the last prefix, so ids stay sorted within this process.
        ms = int(now * 1000)
        if ms > self._last_ms:
            self._last_ms = ms
            self._prefix = f"{ms:012x}{self._middle}"
        c = self._counter = (self._counter + 1) & 0xFFFFFF
        return f"{self._prefix}{c:06x}"


def encode_record(ts: float, ip: str, user_agent: str, cookie: str, body: str, event_id: str) -> bytes:
    """One JSONL line (with its newline)."""
    return orjson.dumps(
        {"ts": int(ts), "ip": ip, "user_agent": user_agent, "cookie": cookie, "body": body, "id": event_id},
        option=orjson.OPT_APPEND_NEWLINE,
    )


def now() -> float:
    return time.time()
