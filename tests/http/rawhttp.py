"""A raw-socket HTTP/1.x client for the framing tests: the exact bytes go out, the answers come back
parsed strictly, and the client knows whether the server closed the connection.

Used by tests/http/test_framing.py, tests/http/test_framing_fuzz.py and tests/e2e/test_proxy.py.
Every wait is bounded by a deadline; nothing here measures time.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

WAIT_S = 3.0  # the longest a test waits for an answer or a close the server owes it


@dataclass(frozen=True, slots=True)
class Answer:
    version: str  # "HTTP/1.1"
    status: int
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in the order sent
    body: bytes

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def interim(self) -> bool:
        return 100 <= self.status < 200

    @property
    def connection(self) -> set[str]:
        """The `Connection` options, lower-cased, of every Connection line."""
        return {t.strip().lower() for v in self.all("connection") for t in v.split(",") if t.strip()}

    @property
    def announces_close(self) -> bool:
        """RFC 9112 §9.3: the server will close after this answer (`close`, or HTTP/1.0 without
        `keep-alive`); otherwise a client (or a proxy's connection pool) may send the next request."""
        opts = self.connection
        return "close" in opts or (self.version == "HTTP/1.0" and "keep-alive" not in opts)

    def __str__(self) -> str:
        return f"{self.version} {self.status} {dict(self.headers)} {self.body[:80]!r}"


class BadAnswer(AssertionError):
    """The server sent bytes that are not an HTTP/1.x response."""


def parse_answers(buf: bytes) -> tuple[list[Answer], bytes]:
    """Every complete answer at the start of `buf`, and the bytes left over (an incomplete one).
    The tests send no HEAD requests, so every final answer but 204/304 has a body."""
    out: list[Answer] = []
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if buf and not b"HTTP/1.".startswith(buf[:7]):
                raise BadAnswer(f"not an HTTP answer: {buf[:200]!r}")
            return out, buf
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[0] not in ("HTTP/1.0", "HTTP/1.1") or not parts[1].isdigit():
            raise BadAnswer(f"bad status line: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise BadAnswer(f"bad header line: {line!r}")
            headers.append((name.lower(), value.strip(" \t")))
        answer_head = Answer(parts[0], int(parts[1]), tuple(headers), b"")
        rest = buf[end + 4:]
        status = answer_head.status
        if answer_head.interim or status in (204, 304):
            size = 0
        elif answer_head.get("transfer-encoding") is not None:
            raise BadAnswer("chunked answers are not expected from this server")
        elif (length := answer_head.get("content-length")) is not None:
            if not length.isdigit() or len(answer_head.all("content-length")) != 1:
                raise BadAnswer(f"bad Content-Length in answer: {answer_head.all('content-length')}")
            size = int(length)
        else:
            raise BadAnswer(f"answer without Content-Length: {lines[0]!r}")
        if len(rest) < size:
            return out, buf
        out.append(Answer(answer_head.version, status, answer_head.headers, rest[:size]))
        buf = rest[size:]


def finals(answers: Iterable[Answer]) -> list[Answer]:
    return [a for a in answers if not a.interim]


class Conn:
    """One TCP connection to 127.0.0.1:`port`. `closed` turns True when the server ends it (EOF or
    reset); `half_closed` when this side has sent its FIN."""

    def __init__(self, port: int, timeout: float = WAIT_S) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.closed = False
        self.half_closed = False
        self.received: list[Answer] = []  # every answer handed out so far, 1xx included
        self._ready: list[Answer] = []  # parsed, not handed out yet (arrived with earlier ones)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """False when the server has already closed on us (its answer may still be readable)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def send_parts(self, parts: Iterable[bytes], pause_s: float = 0.003) -> bool:
        """Each part in its own write, with a short pause between, so the server is likely to read
        them as separate segments (not asserted: only the bytes are)."""
        ok = True
        for i, part in enumerate(parts):
            if i:
                time.sleep(pause_s)
            ok = self.send(part) and ok
        return ok

    def _recv(self, deadline: float) -> bool:
        """One read; False at EOF/reset (sets `closed`) or at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0 or self.closed:
            return False
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:  # reset
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.buf += chunk
        return True

    def _hand_out(self, n: int | None) -> list[Answer]:
        """Parse what arrived; hand out up to `n` final answers (and the 1xx before them), all if None."""
        got, self.buf = parse_answers(self.buf)
        self._ready += got
        out: list[Answer] = []
        while self._ready and (n is None or len(finals(out)) < n):
            out.append(self._ready.pop(0))
        self.received += out
        return out

    def answers(self, n: int, timeout: float | None = None) -> list[Answer]:
        """The next `n` final answers (and the 1xx before them): fewer if the server closed first or
        `timeout` passed. Answers that arrived with them wait for the next call."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = self._hand_out(n)
        while len(finals(out)) < n and self._recv(deadline):
            out += self._hand_out(n - len(finals(out)))
        return out

    def take_all(self) -> list[Answer]:
        """Every answer that has arrived and was not handed out yet, without reading more."""
        return self._hand_out(None)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Read until the server closes the connection (every answer is handed out, into
        `received`); True if it closed in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._hand_out(None)
        while self._recv(deadline):
            self._hand_out(None)
        return self.closed

    def finish(self, timeout: float | None = None) -> list[Answer]:
        """Half-close (the client has nothing more to send), then read every answer until the server
        closes (bounded). What is still buffered and incomplete then is a broken answer."""
        before = len(self.received)
        if not self.half_closed and not self.closed:
            self.half_closed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        self.wait_closed(timeout)
        if self.closed and self.buf:
            raise BadAnswer(f"connection closed inside an answer: {self.buf[:200]!r}")
        return self.received[before:]
