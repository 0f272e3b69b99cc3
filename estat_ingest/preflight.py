"""Start-up checks against the machine, before anything starts: the directories the server writes
(a real create + write + fsync + delete in each) and the listening sockets (HTTP_ADDR, METRICS_ADDR).

`serve` runs both before it builds the pipeline, so a server that cannot work fails with one line
per problem instead of a traceback after half a start; `validate` runs the directory probes.
Blocking: call before the event loop runs (or through asyncio.to_thread).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from estat_ingest.config import Settings
from estat_ingest.fsutil import fsync_dir
from estat_ingest.sockets import make_socket


class StartupError(Exception):
    """One thing on this machine that keeps the server from starting: str(err) is one line."""


def directories(settings: Settings) -> list[tuple[str, str]]:
    """(variable, path) of every directory the server will write with these settings."""
    out = [("DLQ_DIR", settings.dlq_dir)]
    if "file" in settings.sinks:
        out.append(("FILE_SINK_DIR", settings.file_sink_dir))
    if settings.ack_mode == "durable" and settings.spool_dir:  # unset: under DLQ_DIR, probed above
        out.append(("SPOOL_DIR", settings.spool_dir))
    return out


def _as_whom() -> str:
    uid = os.geteuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _why(err: OSError, what: str) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: {err.strerror} (running as {_as_whom()})"
    return f"{what}: {err.strerror}"


def _file_in_the_way(path: str) -> str | None:
    """The nearest existing ancestor of `path` (or `path` itself) when it is not a directory."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    return None if os.path.isdir(p) else p


def probe_dir(path: str) -> str | None:
    """None when a file can be created, written, fsynced and deleted in `path` (created first if
    missing, as the server would), else why not, in a few words."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return f"{blocker} is a file, not a directory"
        return _why(err, f"cannot create {path}")
    probe = os.path.join(path, f".estat-ingest-probe-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        return _why(err, f"cannot create a file in {path}")
    try:
        try:
            os.write(fd, b"estat-ingest start-up probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return _why(err, f"cannot write a file in {path}")
    try:
        os.unlink(probe)
        fsync_dir(path)
    except OSError as err:
        return _why(err, f"cannot delete a file in {path}")
    return None


def directory_problems(settings: Settings, skip: frozenset[str] = frozenset()) -> list[str]:
    """One line per directory variable (not in `skip`) whose directory the server cannot write."""
    out = []
    for name, path in directories(settings):
        if name in skip:
            continue
        why = probe_dir(path)
        if why is not None:
            out.append(f"{name}={path!r} is not usable: {why}")
    return out


def bind(settings: Settings, *, reuse_port: bool = False) -> socket.socket:
    """The server's socket, bound to HTTP_ADDR but not listening yet (the HTTP front listens once
    the pipeline runs, so no connection waits in the backlog of a server still starting).
    Raises `StartupError` naming HTTP_ADDR when the address cannot be had."""
    return _bind("HTTP_ADDR", settings.http_host, settings.http_port, reuse_port)


def bind_metrics(settings: Settings) -> socket.socket | None:
    """The METRICS_ADDR listener's socket (bound, not listening), None when it is not set; one
    process binds it (`serve`, or the parent of `serve --workers N`), so no SO_REUSEPORT."""
    if not settings.metrics_host:
        return None
    return _bind("METRICS_ADDR", settings.metrics_host, settings.metrics_port, False)


def _bind(name: str, host: str, port: int, reuse_port: bool) -> socket.socket:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return make_socket(host, port, reuse_port, listen=False)  # closed again when it fails
    except OSError as err:
        if isinstance(err, socket.gaierror):
            why = f"cannot resolve {host}: {err.strerror}"
        elif err.errno == errno.EADDRINUSE:
            why = f"{shown} is already in use by another program"
        elif err.errno == errno.EADDRNOTAVAIL:
            why = f"{host} is not an address of this machine"
        elif err.errno in (errno.EACCES, errno.EPERM) and 0 < port < 1024:
            why = f"port {port} needs root or CAP_NET_BIND_SERVICE (running as {_as_whom()})"
        else:
            why = err.strerror or str(err)
        raise StartupError(f"{name}={shown!r} is not usable: {why}") from None
