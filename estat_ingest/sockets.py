"""The listening socket, made in one place: for the start-up check (`preflight.bind`, before
anything starts), for `serve()` when it is given none, and for each `serve --workers N` process.

A socket made for a server still starting is left unlistened (`listen=False`): the front's
create_server listens once the pipeline runs, so no connection waits in the backlog of a server
that is not ready. With workers, every process binds the same port with SO_REUSEPORT and the
kernel spreads new connections over the sockets that are listening.
"""

from __future__ import annotations

import socket

BACKLOG = 1024


def make_socket(host: str, port: int, reuse_port: bool = False, *, listen: bool = True) -> socket.socket:
    """A non-blocking TCP socket bound to `host:port` (IPv6 when `host` has a `:`), listening
    unless `listen=False`; closed again if any step fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
