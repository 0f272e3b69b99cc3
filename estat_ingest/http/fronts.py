"""The seam between `app.serve()` and an HTTP front: `HttpFront`, the three calls serve() makes,
and `make_front`, which builds the front `HTTP_FRONT` names.

Both fronts parse HTTP/1.1 and write answers; everything else (the limits, the canned answers,
admission, the draining close) they take from the same places (http/policy.py, the Collector), so a
front can be changed or added without reading the pipeline.
"""

from __future__ import annotations

import socket
from typing import Protocol

from estat_ingest.config import Settings
from estat_ingest.http.collect import Collector
from estat_ingest.metrics import Metrics


class HttpFront(Protocol):
    """What `serve()` needs from an HTTP front (`HTTP_FRONT`): aiohttp, or http.fast's Front."""

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock` (bound; listening or not)."""

    async def stop_listening(self) -> None:
        """Refuse new connections; open ones are still served."""

    async def close(self) -> None:
        """Close every connection; after it, no request reaches the Collector."""


class ShutdownBudget(Protocol):
    """The part of serve()'s lifecycle a front needs: how long a running handler may take at close."""

    def http_grace(self) -> float: ...


def make_front(settings: Settings, collector: Collector, metrics: Metrics, lifecycle: ShutdownBudget) -> HttpFront:
    """The front `settings.http_front` names, imported only when chosen (httptools or aiohttp's runner)."""
    if settings.http_front == "fast":
        from estat_ingest.http.fast.front import Front

        return Front(collector, metrics)
    from estat_ingest.http.aiohttp_front import AiohttpFront

    return AiohttpFront(collector, metrics, handler_grace_s=lifecycle.http_grace())
