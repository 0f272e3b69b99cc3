"""Recovery of dead owners' spool files into the DLQ (blocking: run in a thread).

For each claimed owner directory (spool/lease.py `claim`) and each of its sink subdirectories,
every spool file is walked member by member; a torn tail (bytes never acknowledged) is cut off and
counted, a file with no complete member is deleted, and the rest is moved into
`DLQ_ROOT/<sink>/<name>` with its meta (reason `recovered`), under the name — hence the key — its
batch was given when it opened. The DLQ replayer delivers it like any other entry; an object S3
stored before the crash is overwritten, never duplicated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import orjson

from estat_ingest.dlq import files
from estat_ingest.formats.codec import checksum, compression_of
from estat_ingest.formats.keys import unix_of_name
from estat_ingest.spool import lease, segment

log = logging.getLogger("estat_ingest.spool")


@dataclass(slots=True)
class Recovered:
    files: int = 0
    events: int = 0
    torn_bytes: int = 0
    moved: list[tuple[str, str, int]] = field(default_factory=list)  # (sink, DLQ path, size)


def recover_owner(claimed: str, dlq_root: str) -> Recovered:
    """Move every complete batch of a claimed owner directory into the DLQ; remove the directory."""
    out = Recovered()
    with contextlib.suppress(FileNotFoundError), os.scandir(claimed) as it:
        sinks = [e.name for e in it if e.is_dir(follow_symlinks=False)]
    for sink in sinks:
        d = os.path.join(claimed, sink)
        dest = os.path.join(dlq_root, sink)
        os.makedirs(dest, exist_ok=True)
        for fname in sorted(os.listdir(d)):
            parsed = segment.parse_spool_name(fname)
            src = os.path.join(d, fname)
            if parsed is None:
                log.warning("foreign file in a spool directory left alone", extra={"file": src})
                continue
            partition, name = parsed
            compression = compression_of(name)
            data = segment.read(src)
            m = segment.walk_members(data, compression)
            out.torn_bytes += m.torn
            if m.events == 0:
                os.unlink(src)
                continue
            if m.torn:
                segment.cut(src, m.good)
                data = data[:m.good]
            unix = unix_of_name(name) or 0
            meta = {"num_events": m.events, "sink": sink, "key": f"{partition}/{name}", "partition": partition,
                    "first_ts": float(unix), "created_at": time.time(), "compression": compression,
                    "checksum": checksum(data), "attempts": 0, "reason": "recovered"}
            path = os.path.join(dest, name)
            if not files.take(src, path, orjson.dumps(meta)):
                raise OSError(f"could not move {src} into {dest}")
            out.files += 1
            out.events += m.events
            out.moved.append((sink, path, len(data)))
        with contextlib.suppress(OSError):
            os.rmdir(d)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(claimed, lease.LEASE))
    with contextlib.suppress(OSError):
        for leftover in os.listdir(claimed):  # temp files of an interrupted lease write
            if leftover.startswith("."):
                os.unlink(os.path.join(claimed, leftover))
        os.rmdir(claimed)
    return out
