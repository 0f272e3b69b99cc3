"""Leases: which spool owners are alive (blocking helpers; called in threads).

Each process that spools owns `SPOOL_DIR/<owner>/` and keeps `SPOOL_DIR/<owner>/lease.json` fresh
(its mtime is touched every few seconds). The lease says where the owner runs: host, boot id, pid
and the pid's start time. An owner is dead when
- it ran on this host since this boot and its pid is gone or now belongs to another process
  (a crash, kill -9, a container restart that reused the pid): known at once;
- otherwise, when its lease has not been touched for SPOOL_ADOPT_AFTER (a peer on shared storage).
Claiming a dead owner's spool is one atomic rename of its directory, so of several live peers
exactly one adopts it; the owner itself, if it was only slow, sees its lease gone after its next
fsync and stops acknowledging (spool/__init__.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass

import orjson

from estat_ingest.fsutil import fsync_dir, write_tmp

LEASE = "lease.json"
ADOPTING = ".adopting-"  # SPOOL_DIR/.adopting-<owner>@<adopter>: a claimed spool being recovered
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def owner_of(instance: str) -> str:
    """A spool owner id (a directory name without "@" or "/") from a process's instance name."""
    return "".join(c if c in _SAFE else "-" for c in instance) or "estat"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The pid's start time (clock ticks since boot) from /proc, or None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else ""


@dataclass(frozen=True, slots=True)
class Holder:
    host: str
    boot_id: str
    pid: int
    pid_start: str

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), _boot_id(), pid, _start_time(pid) or "")


def write_lease(owner_dir: str, holder: Holder) -> None:
    os.makedirs(owner_dir, exist_ok=True)
    path = os.path.join(owner_dir, LEASE)
    data = orjson.dumps({"host": holder.host, "boot_id": holder.boot_id, "pid": holder.pid,
                         "pid_start": holder.pid_start, "since": time.time()})
    os.replace(write_tmp(path, data), path)
    fsync_dir(owner_dir)
    fsync_dir(os.path.dirname(owner_dir))


def renew(owner_dir: str) -> bool:
    """Touch our lease; False if it is gone (a peer adopted our spool: stop acknowledging)."""
    try:
        os.utime(os.path.join(owner_dir, LEASE))
    except FileNotFoundError:
        return False
    return True


def held(owner_dir: str) -> bool:
    """Our lease is still where we left it (one stat)."""
    return os.path.exists(os.path.join(owner_dir, LEASE))


def read_holder(owner_dir: str) -> tuple[Holder | None, float | None]:
    """The lease's holder and its last renewal (mtime), or (None, None) without a readable lease."""
    path = os.path.join(owner_dir, LEASE)
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            d = orjson.loads(f.read())
        h = Holder(str(d["host"]), str(d["boot_id"]), int(d["pid"]), str(d["pid_start"]))
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            return None, os.stat(owner_dir).st_mtime
        return None, None
    return h, st.st_mtime


def is_dead(owner_dir: str, me: Holder, now: float, adopt_after_s: float) -> bool:
    holder, renewed = read_holder(owner_dir)
    if holder is not None and holder.host == me.host and holder.boot_id and holder.boot_id == me.boot_id:
        if holder.pid == me.pid:
            return holder.pid_start != me.pid_start  # our pid, an earlier process
        start = _start_time(holder.pid)
        return start is None or start != holder.pid_start
    return renewed is None or now - renewed > adopt_after_s


def dead_owners(spool_dir: str, me: Holder, own: str, now: float, adopt_after_s: float) -> list[str]:
    """Owner directories of SPOOL_DIR whose owner is dead (never `own`)."""
    out = []
    with contextlib.suppress(FileNotFoundError), os.scandir(spool_dir) as it:
        for e in it:
            if e.name == own or e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
            if is_dead(e.path, me, now, adopt_after_s):
                out.append(e.name)
    return sorted(out)


def stale_adoptions(spool_dir: str, me: Holder, now: float, adopt_after_s: float) -> list[str]:
    """`.adopting-…` directories whose adopter died before it finished (their files are still there)."""
    out = []
    with contextlib.suppress(FileNotFoundError), os.scandir(spool_dir) as it:
        for e in it:
            if not e.name.startswith(ADOPTING) or not e.is_dir(follow_symlinks=False):
                continue
            _, sep, adopter = e.name.rpartition("@")
            # the adopter's own lease says whether the adoption is still under way
            if sep and is_dead(os.path.join(spool_dir, adopter), me, now, adopt_after_s):
                out.append(e.name)
    return sorted(out)


def claim(spool_dir: str, owner: str, me: str) -> str | None:
    """Take a dead owner's spool: rename its directory; the claimed path, or None if another peer won."""
    src = os.path.join(spool_dir, owner)
    base = owner[len(ADOPTING):].rpartition("@")[0] if owner.startswith(ADOPTING) else owner
    dst = os.path.join(spool_dir, f"{ADOPTING}{base}@{me}")
    try:
        os.rename(src, dst)
    except (FileNotFoundError, OSError):
        return None
    fsync_dir(spool_dir)
    return dst
