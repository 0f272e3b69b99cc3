"""Object names and keys, exactly as v1 (DESIGN.md §3).

name      = <unix>_<instance>_<counter>.jsonl.gz        (.jsonl.zst for zstd)
partition = dt=<YYYY-MM-DD>/hr=<HH>                      in PARTITION_TZ, from the batch's first event
key       = <prefix>/<partition>/<name>                  no `//` whatever the prefix
`<instance>` is INSTANCE_ID plus a per-process random suffix (and a worker index), so names cannot
collide across restarts or between workers; readers split a name from both ends.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

NAME_RE = re.compile(r"^(?P<unix>\d{1,12})_(?P<instance>.+)_(?P<counter>\d{6})(?P<ext>\.jsonl\.(?:gz|zst))?$")


class Namer:
    __slots__ = ("_counter", "ext", "instance")

    def __init__(self, instance_id: str, ext: str, worker: int | None = None) -> None:
        safe = instance_id.replace("/", "-") or "estat"
        suffix = os.urandom(3).hex()
        self.instance = f"{safe}-{suffix}" if worker is None else f"{safe}-w{worker}-{suffix}"
        self.ext = ext
        self._counter = 0

    def next(self, unix: float) -> str:
        self._counter = self._counter % 999_999 + 1  # 000001 … 999999, as v1
        return f"{int(unix):010d}_{self.instance}_{self._counter:06d}{self.ext}"


@lru_cache(maxsize=16)
def _zone(tz: str) -> ZoneInfo:
    return ZoneInfo(tz)


def partition(ts: float, tz: str) -> str:
    return datetime.fromtimestamp(ts, _zone(tz)).strftime("dt=%Y-%m-%d/hr=%H")


def join_key(*parts: str) -> str:
    return "/".join(seg for p in parts for seg in p.split("/") if seg)


def unix_of_name(name: str) -> int | None:
    """The epoch seconds at the start of a v1-style name, or None for a foreign name."""
    m = NAME_RE.match(name)
    return int(m.group("unix")) if m else None


# a spool file (ACK_MODE=durable): the open batch's partition and name in one file name
def spool_name(partition: str, name: str) -> str:
    return f"{partition.replace('/', '+')}+{name}"


def parse_spool_name(fname: str) -> tuple[str, str] | None:
    """(partition, name) of a spool file name, or None for anything else."""
    parts = fname.split("+", 2)
    if len(parts) != 3 or not parts[0].startswith("dt=") or not parts[1].startswith("hr="):
        return None
    if not NAME_RE.match(parts[2]):
        return None
    return f"{parts[0]}/{parts[1]}", parts[2]
