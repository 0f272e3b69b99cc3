"""Record lines → `_bulk` documents (pure): the `create` action with `_id` = the event id, and a
searchable document (the parsed body, `@timestamp`, ip, user agent)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from estat_ingest.formats.keys import NAME_RE


@dataclass(slots=True)
class Doc:
    line: bytes  # the original JSONL record (what goes back to the DLQ)
    index: str
    id: str
    body: bytes  # its two NDJSON lines: the `create` action and the document


@dataclass(slots=True)
class Bulk:
    docs: list[Doc] = field(default_factory=list)
    invalid: list[tuple[bytes, str]] = field(default_factory=list)  # (line, why) — records not indexable


class DocumentBuilder:
    """Record line → (`create` action, document). Pure; caches per second of receive time."""

    def __init__(self, index: str, tz: str, data_stream: bool) -> None:
        self.template = index
        self.tz = ZoneInfo(tz)
        self.data_stream = data_stream
        self._index_cache: dict[int, str] = {}
        self._iso_cache: dict[int, str] = {}

    def index_of(self, ts: int) -> str:
        if self.data_stream:
            return self.template
        name = self._index_cache.get(ts)
        if name is None:
            if len(self._index_cache) > 4096:
                self._index_cache.clear()
            name = datetime.fromtimestamp(ts, self.tz).strftime(self.template)
            self._index_cache[ts] = name
        return name

    def timestamp(self, ts: int, event_id: str) -> str:
        """ISO-8601 UTC with milliseconds: ts is whole seconds, the id's first 12 hex are epoch ms."""
        ms = ts * 1000
        try:
            id_ms = int(event_id[:12], 16)
        except ValueError:
            id_ms = -1
        if id_ms // 1000 == ts:
            ms = id_ms
        base = self._iso_cache.get(ts)
        if base is None:
            if len(self._iso_cache) > 4096:
                self._iso_cache.clear()
            base = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._iso_cache[ts] = base
        return f"{base}.{ms % 1000:03d}Z"

    @staticmethod
    def event_of(body: object) -> dict[str, Any]:
        """The parsed body when it is a JSON object; anything else (a GET query string, an array,
        a scalar, text when VALIDATE_JSON=false) as {"raw": <body as sent>}."""
        if isinstance(body, str):
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                return {"raw": body}
            if isinstance(parsed, dict):
                return parsed
            return {"raw": body}
        return {"raw": orjson.dumps(body).decode()}

    def add(self, bulk: Bulk, line: bytes) -> None:
        try:
            rec = orjson.loads(line)
            ts = int(rec["ts"])
            event_id = rec["id"]
            if not isinstance(event_id, str) or not event_id:
                raise ValueError("id")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            bulk.invalid.append((line, f"invalid record: {type(err).__name__}"))
            return
        index = self.index_of(ts)
        doc = {
            "@timestamp": self.timestamp(ts, event_id),
            "ip": rec.get("ip", ""),
            "user_agent": rec.get("user_agent", ""),
            "event": self.event_of(rec.get("body", "")),
            "id": event_id,
        }
        body = orjson.dumps({"create": {"_index": index, "_id": event_id}}, option=orjson.OPT_APPEND_NEWLINE) \
            + orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
        bulk.docs.append(Doc(line if line.endswith(b"\n") else line + b"\n", index, event_id, body))


def rejected_name(name: str, attempt: int) -> str:
    """A distinct DLQ name for the items rejected by one attempt, still a v1-style name."""
    m = NAME_RE.match(name)
    if m:
        return f"{m.group('unix')}_{m.group('instance')}-rej{attempt}_{m.group('counter')}{m.group('ext') or ''}"
    for ext in (".jsonl.gz", ".jsonl.zst"):
        if name.endswith(ext):
            return f"{name[:-len(ext)]}-rej{attempt}{ext}"
    return f"{name}-rej{attempt}"


def split_lines(raw: bytes) -> tuple[bytes, ...]:
    """The record lines of a decompressed batch (a DLQ replay has no `Payload.lines`)."""
    return tuple(line + b"\n" for line in raw.split(b"\n") if line.strip())
