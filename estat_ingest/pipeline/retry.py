"""Retry policy (pure): capped exponential backoff with "equal jitter" (half fixed, half random)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 0.2
    cap_s: float = 2.0

    def delay(self, failures: int, rand: random.Random | None = None) -> float:
        """Delay before the next attempt after `failures` consecutive failures (≥ 1)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** max(0, failures - 1))
        r: float = (rand or random).random()
        return ceiling / 2 + r * ceiling / 2  # "equal jitter": never zero, never above the cap
