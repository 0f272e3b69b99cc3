"""The OpenSearch nodes of OPENSEARCH_URL: round-robin, a failing node cooled down for a while."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("estat_ingest.sinks.opensearch")

NODE_COOLDOWN_S = (2.0, 60.0)  # a failing node is skipped for 2 s, doubling up to 60 s


class Nodes:
    """Round-robin over OPENSEARCH_URL; a node that failed is skipped until its cooldown ends."""

    def __init__(self, urls: Sequence[str], clock: Any = time.monotonic) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._clock = clock
        self._next = 0
        self._down_until = [0.0] * len(self.urls)
        self._streak = [0] * len(self.urls)

    def pick(self) -> str:
        now = self._clock()
        n = len(self.urls)
        for k in range(n):
            i = (self._next + k) % n
            if self._down_until[i] <= now:
                self._next = (i + 1) % n
                return self.urls[i]
        # every node is cooling down: try the one that comes back first rather than not at all
        i = min(range(n), key=lambda j: self._down_until[j])
        self._next = (i + 1) % n
        return self.urls[i]

    def failed(self, url: str) -> None:
        i = self.urls.index(url)
        self._streak[i] += 1
        base, cap = NODE_COOLDOWN_S
        cooldown = min(cap, base * 2 ** (self._streak[i] - 1))
        if self._streak[i] == 1 or self._down_until[i] <= self._clock():
            log.warning("opensearch node failing: skipped for a while",
                        extra={"sink": "opensearch", "node": url, "cooldown_seconds": cooldown})
        self._down_until[i] = self._clock() + cooldown

    def ok(self, url: str) -> None:
        i = self.urls.index(url)
        if self._streak[i]:
            log.info("opensearch node back", extra={"sink": "opensearch", "node": url})
        self._streak[i] = 0
        self._down_until[i] = 0.0
