"""One DLQ entry on disk: names, meta, the claim protocol, verification (blocking parts run in threads).

Names in a DLQ directory
- `<name>`                            a data file (the encoded batch), `<name>` matches keys.NAME_RE
- `<name>.meta.json`                  its meta (absent for a file torn between the two renames)
- `<name>.claim-<unix>-<owner>`       a data file claimed by a replayer at `<unix>` (epoch seconds)
- `.<anything>.tmp-<pid>-<rand>`      a write in progress (or left by a crash)
- `rejected/`, `corrupt/`             files moved aside (never replayed automatically)
Anything else is foreign: ignored, counted by `stats`, reported once in the log.

Claim protocol: `rename(<name>, <name>.claim-<unix>-<owner>)` is atomic (also on NFS/EFS), so of
several replayers on one directory exactly one wins; the others get ENOENT and skip the file. The
winner deletes the claim after delivery, or renames it back. A claim older than DLQ_CLAIM_TIMEOUT
was left by a dead (or hung) process: any replayer renames it back to `<name>` and it is replayed
again; if its owner was only slow, the second send goes to the same key (idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import time
from typing import Any

import orjson

from estat_ingest.formats import codec
from estat_ingest.formats.codec import CorruptPayload, compression_of, decompress
from estat_ingest.formats.keys import NAME_RE, partition, unix_of_name
from estat_ingest.fsutil import fsync_dir, write_tmp
from estat_ingest.sinks.base import Payload

META_SUFFIX = ".meta.json"
CLAIM_MARK = ".claim-"
CLAIM_RE = re.compile(r"^(?P<name>.+)\.claim-(?P<unix>\d{1,12})-(?P<owner>.+)$")
TMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]+$")
REJECTED = "rejected"
CORRUPT = "corrupt"
SUBDIRS = (REJECTED, CORRUPT)
JSON_SLICE = 1000  # lines checked between two yields to the event loop


def kind_of(name: str) -> str:
    """data | meta | claim | temp | foreign (by name only; the caller checks it is a regular file)."""
    if name.startswith("."):
        return "temp" if TMP_RE.match(name) else "foreign"
    if name.endswith(META_SUFFIX):
        return "meta"
    if CLAIM_MARK in name:
        return "claim" if CLAIM_RE.match(name) else "foreign"
    return "data" if NAME_RE.match(name) else "foreign"


def owner_id(instance: str) -> str:
    return f"{instance.replace('/', '-')}-{os.getpid()}"


# ------------------------------------------------------------------------------ claims (blocking)


def claim(directory: str, name: str, owner: str, now: float | None = None) -> str | None:
    """Atomically take `<name>`; return the claimed path, or None if another process has it."""
    path = os.path.join(directory, name)
    cpath = f"{path}{CLAIM_MARK}{int(now if now is not None else time.time())}-{owner}"
    try:
        os.rename(path, cpath)
    except FileNotFoundError:
        return None
    return cpath


def release(cpath: str, directory: str, name: str) -> bool:
    """Give a claimed file back (after a failed attempt). False if it was already recovered."""
    try:
        os.rename(cpath, os.path.join(directory, name))
    except FileNotFoundError:
        return False
    return True


def remove(cpath: str, directory: str, name: str) -> bool:
    """Delete a claimed entry (after delivery or by policy). False if the claim had been recovered.

    Not followed by a directory fsync: a deletion lost in a power cut only means one more replay of
    a delivered batch, to the same key (idempotent), and it saves a disk flush per replayed file."""
    try:
        os.unlink(cpath)
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, name + META_SUFFIX))
    return True


def stale_claim(claim_name: str, now: float, timeout_s: float) -> str | None:
    """The data name of a claim older than `timeout_s`, else None."""
    m = CLAIM_RE.match(claim_name)
    if m is None or now - int(m.group("unix")) <= timeout_s:
        return None
    return m.group("name")


def recover(directory: str, claim_name: str, name: str) -> bool:
    """Rename a stale claim back to `<name>` (only one recoverer wins)."""
    path = os.path.join(directory, name)
    if os.path.exists(path):  # a newer copy exists: the stale claim is a leftover
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, claim_name))
        return False
    try:
        os.rename(os.path.join(directory, claim_name), path)
    except FileNotFoundError:
        return False
    return True


def move_aside(cpath: str, directory: str, name: str, sub: str) -> str:
    """Move a claimed data file and its meta to `directory/sub/` (rejected/ or corrupt/)."""
    dest = os.path.join(directory, sub)
    os.makedirs(dest, exist_ok=True)
    meta = os.path.join(directory, name + META_SUFFIX)
    if os.path.exists(meta):
        os.replace(meta, os.path.join(dest, name + META_SUFFIX))
    os.replace(cpath, os.path.join(dest, name))
    fsync_dir(dest)
    fsync_dir(directory)
    return os.path.join(dest, name)


def temp_is_stale(name: str, age_s: float, own_pid_is_dead: bool, claim_timeout_s: float) -> bool:
    """A temp file is removed when its writer is gone: a dead local pid (and 10 s old, in case the pid
    belongs to another host on shared storage), or older than the claim timeout whatever the pid."""
    m = TMP_RE.match(name)
    if m is None:
        return False
    if age_s > claim_timeout_s:
        return True
    pid = int(m.group("pid"))
    if pid == os.getpid():
        return own_pid_is_dead and age_s > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return age_s > 10
    except PermissionError:
        return False
    return False


def take(src: str, path: str, meta: bytes) -> bool:
    """Move a complete batch file (a spool file) in as the DLQ entry `path`: rename, then its meta,
    both directories fsynced. False when it cannot be renamed here (another file system): the
    caller writes a copy instead."""
    try:
        os.rename(src, path)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.ENOENT):
            return False
        raise
    tmp = write_tmp(path + META_SUFFIX, meta)
    os.replace(tmp, path + META_SUFFIX)
    fsync_dir(os.path.dirname(path))
    fsync_dir(os.path.dirname(src))
    return True


# ------------------------------------------------------------------------------ meta and data


def read_meta(directory: str, name: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(directory, name + META_SUFFIX), "rb") as f:
            meta = orjson.loads(f.read())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def write_meta(directory: str, name: str, meta: dict[str, Any]) -> None:
    path = os.path.join(directory, name + META_SUFFIX)
    tmp = write_tmp(path, orjson.dumps(meta))
    os.replace(tmp, path)
    fsync_dir(directory)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def events_of(meta: dict[str, Any] | None) -> int | None:
    n = None if meta is None else meta.get("num_events")
    return n if isinstance(n, int) and n >= 0 else None


def compression_from(name: str, meta: dict[str, Any] | None) -> str:
    c = None if meta is None else meta.get("compression")
    return c if c in ("gzip", "zstd") else compression_of(name)


def verify_sync(data: bytes, compression: str, meta: dict[str, Any] | None) -> int:
    """Full verification in one blocking call (CLI process): stream, checksum, every line, count."""
    return codec.verify(data, compression, _checksum_of(meta), events_of(meta))


async def verify_async(data: bytes, compression: str, meta: dict[str, Any] | None) -> int:
    """The same verification from the event loop: the stream in a thread (decompression and hashing
    release the GIL), the JSON checks on the loop in slices of JSON_SLICE lines (orjson holds it)."""
    lines = await asyncio.to_thread(codec.stream_lines, data, compression, _checksum_of(meta))
    for start in range(0, len(lines), JSON_SLICE):
        codec.check_json(lines, start, start + JSON_SLICE)
        await asyncio.sleep(0)
    return codec.check_count(len(lines), events_of(meta))


def _checksum_of(meta: dict[str, Any] | None) -> str | None:
    want = None if meta is None else meta.get("checksum")
    return want if isinstance(want, str) and want else None


def payload_of(name: str, data: bytes, meta: dict[str, Any] | None, events: int, tz: str) -> Payload:
    """The batch as it was: same name, same partition (meta, or the unix time in a v1 name)."""
    m = meta or {}
    part = m.get("partition")
    if not isinstance(part, str) or not part:
        key = m.get("key")
        if isinstance(key, str) and key.endswith("/" + name):
            part = key[: -len(name) - 1]
        else:
            part = partition(float(unix_of_name(name) or 0), tz)
    first_ts = m.get("first_ts")
    if not isinstance(first_ts, (int, float)):
        first_ts = float(unix_of_name(name) or 0)
    attempts = m.get("attempts")
    return Payload(
        name=name,
        partition=part,
        num_events=events,
        data=data,
        compression=compression_from(name, meta),
        first_ts=float(first_ts),
        lines=None,
        attempts=attempts if isinstance(attempts, int) else 0,
        replayed=True,
    )


def events_for_drop(data_path: str, name: str, meta: dict[str, Any] | None) -> int:
    """Events in a file deleted without delivery: meta, else the line count, else 0 (unreadable)."""
    n = events_of(meta)
    if n is not None:
        return n
    try:
        return decompress(read_file(data_path), compression_from(name, meta)).count(b"\n")
    except (OSError, CorruptPayload):
        return 0
