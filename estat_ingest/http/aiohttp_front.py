"""The aiohttp front (`HTTP_FRONT=aiohttp`): routes.py's handlers behind aiohttp's runner, with the
parser limits, protocol-error accounting, the connection guard (http/guard.py) and connections
that keep the edge policy's framing rules (http/aiohttp_conn.py)."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from estat_ingest.http.aiohttp_conn import FramingRunner
from estat_ingest.http.collect import Collector
from estat_ingest.http.policy import LOG_EVERY_S, ProtocolErrors
from estat_ingest.http.routes import COLLECTOR, GUARD, METRICS, build_app
from estat_ingest.metrics import Metrics


class AiohttpFront:
    """The aiohttp front: routes.py's handlers, the connection guard, aiohttp's runner."""

    def __init__(self, collector: Collector, metrics: Metrics, *, handler_grace_s: float) -> None:
        self.app = build_app(collector, metrics)
        self.runner = FramingRunner(
            self.app,
            collector,
            handle_signals=False,
            access_log=None,
            # a handler still running after serve()'s wait for in-flight requests gets this long
            shutdown_timeout=handler_grace_s,
            **server_kwargs(self.app),  # the edge limits (http/policy.py), auto_decompress off
        )
        self.site: web.SockSite | None = None

    async def start(self, sock: socket.socket) -> None:
        await self.runner.setup()  # starts the connection guard (cleanup_ctx)
        self.app[GUARD].attach(self.runner.server)  # header-read deadline sweeps the server's connections
        self.site = web.SockSite(self.runner, sock)
        await self.site.start()

    async def stop_listening(self) -> None:
        # aiohttp's own shutdown ignores bytes that arrive after it starts, which would cut slow
        # bodies off: serve() stops the listener only, then waits for requests inside /collect
        if self.site is not None:
            await self.site.stop()

    async def close(self) -> None:
        await self.runner.cleanup()  # idle connections closed, running handlers get shutdown_timeout


class ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The `logger` aiohttp's request handler uses for what happens before /collect runs.

    A malformed request (bad request line, smuggling attempt, header over MAX_HEADER_BYTES or
    MAX_HEADERS, non-HTTP bytes) is answered 400 by aiohttp's parser, which would log a full
    traceback per request. Here each one goes to `ProtocolErrors` (counted, rate-limited, no
    traceback unless it is a server_error).
    """

    def __init__(self, metrics: Metrics, every: float = LOG_EVERY_S) -> None:
        super().__init__(logging.getLogger("estat_ingest.http.protocol"), {})
        self.errors = ProtocolErrors(metrics, every)

    def _note(self, msg: object, args: tuple[Any, ...], exc: object) -> None:
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "headers" in str(exc).lower()):
            reason = "header_too_large"
        elif isinstance(exc, HttpProcessingError):
            reason = "bad_http"
        else:
            reason = "server_error"
        self.errors.note(reason, str(exc) if exc is not None else "",
                         exc if isinstance(exc, BaseException) else None, msg, args)

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        self._note(msg, args, exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1])

    def error(self, msg: object, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, BaseException) or exc_info:
            self.exception(msg, *args, exc_info=exc_info)
        else:
            self.logger.error(msg, *args, **kw)

    def debug(self, msg: object, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):  # non-HTTP bytes on the first request
            self._note(msg, args, exc_info)
        else:
            self.logger.debug(msg, *args, exc_info=exc_info, **kw)


def server_kwargs(app: web.Application) -> dict[str, Any]:
    """aiohttp request-handler limits for AppRunner/TestServer (the parser runs before /collect).

    auto_decompress is off: /collect decodes Content-Encoding itself under MAX_BODY_SIZE
    (aiohttp would inflate a bomb in full). The limits and times are the edge policy's
    (http/policy.py); aiohttp's keep-alive timer also closes a connection whose request headers are
    still incomplete when it fires (slowloris bound). Parser errors go to ProtocolLog (counted,
    rate-limited).
    """
    limits = app[COLLECTOR].limits
    return {
        "auto_decompress": False,
        "max_line_size": limits.request_line_bytes,
        "max_field_size": limits.header_line_bytes,
        "max_headers": limits.headers,
        "keepalive_timeout": limits.keepalive_s,
        "lingering_time": limits.linger_s,
        "logger": ProtocolLog(app[METRICS]),
    }
