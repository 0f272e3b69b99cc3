"""Response bytes of the fast front: the status line, Date (formatted once per second), Server,
Content-Length, the reply's headers, `Connection: close` when the connection ends (else
`Connection: keep-alive` when the request asked for it)."""

from __future__ import annotations

import time
from collections.abc import Mapping

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
           415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}


class DateHeader:
    """The Date header, formatted once per second."""

    def __init__(self) -> None:
        self._sec = -1
        self.value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._sec:
            self._sec = now
            self.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self.value


def render(status: int, headers: Mapping[str, str], body: bytes, date: bytes, close: bool,
           head: bool = False, keep_alive: bool = False) -> bytes:
    """One HTTP/1.1 response; `head`: the headers of this answer without its body; `close`: the
    connection ends after it (`Connection: close`), else `keep_alive`: it says `Connection:
    keep-alive` (asked for by the request; an HTTP/1.0 client needs it to keep the connection)."""
    out = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode(),
           b"Date: ", date, b"\r\nServer: estat-ingest\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
    has_type = False
    for k, v in headers.items():
        lk = k.lower()
        if lk == "content-length":
            continue
        has_type = has_type or lk == "content-type"
        out.append(f"{k}: {v}\r\n".encode("latin-1", "replace"))
    if body and not has_type:
        out.append(b"Content-Type: text/plain; charset=utf-8\r\n")
    if close:
        out.append(b"Connection: close\r\n")
    elif keep_alive:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    if not head:
        out.append(body)
    return b"".join(out)
