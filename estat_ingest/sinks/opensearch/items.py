"""What a `_bulk` answer means for the documents it carried (pure functions, no I/O).

The HTTP status of the whole request decides first (`classify_status`); with a 200 every item is
read (`read_items`): 2xx and 409 (`create` of an `_id` that is already there) are done, 429/5xx
and items without an answer are worth retrying alone, any other 4xx (mapping errors) is rejected
for good with its error. Vector's Elasticsearch retry logic makes the same four-way split.

Errors about the destination rather than the documents are outages (`Result.outage`): 401/403,
and, for the whole request or any item, a closed index (`index_closed_exception`), a cluster or
index block (`cluster_block_exception`: read-only, flood-stage disk) or a missing index that may
not be auto-created (`index_not_found_exception`). Such items are kept for a later attempt, never
rejected for good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from estat_ingest.sinks.base import Outcome, Result, outage
from estat_ingest.sinks.opensearch.documents import Doc

MAX_REASON = 500  # characters of an item error reason kept in the DLQ meta

# error types about the index or the cluster, not the document, with the reason they count under
OUTAGE_TYPES = {
    "index_closed_exception": "index_closed",
    "cluster_block_exception": "cluster_block",
    "index_not_found_exception": "index_missing",
}


def error_type(content: bytes) -> str:
    """`error.type` of an OpenSearch error answer ("" when there is none)."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return ""
    err = body.get("error") if isinstance(body, dict) else None
    t = err.get("type") if isinstance(err, dict) else None
    return t if isinstance(t, str) else ""


def classify_status(status: int, content: bytes = b"") -> Result | None:
    """None for a 200 (read the items); otherwise the whole request's outcome."""
    if status == 200:
        return None
    if status != 429 and status < 500 and status >= 400:
        kind = error_type(content)
        if kind in OUTAGE_TYPES:
            return outage(OUTAGE_TYPES[kind], error=kind)
    elif status == 429 and error_type(content) == "cluster_block_exception":  # flood-stage disk
        return outage("cluster_block", Outcome.RETRY, error="cluster_block_exception")
    if status == 429:
        return Result(Outcome.RETRY, "throttled")
    if status >= 500:
        return Result(Outcome.RETRY, "server_error")
    if status in (401, 403):
        return outage("auth", error=f"status {status}")
    if status == 413:
        return Result(Outcome.REJECT, "too_large")
    if 200 < status < 300:
        return Result(Outcome.RETRY, "bad_response")
    return Result(Outcome.REJECT, "client_error")


@dataclass(slots=True)
class Items:
    """The documents of one `_bulk` request, by what happened to them."""

    created: int = 0
    duplicate: int = 0
    retry: list[Doc] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # why the retried ones are retried
    rejected: list[tuple[bytes, dict[str, object]]] = field(default_factory=list)  # (record, its error)
    outage: str = ""  # an item said the index or cluster refuses everything (its reason)

    def retry_doc(self, doc: Doc, reason: str) -> None:
        self.retry.append(doc)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def read_items(content: bytes, docs: Sequence[Doc]) -> Items | Result:
    """Each document's outcome from a 200 answer; a RETRY Result when it is not a `_bulk` answer."""
    try:
        response = orjson.loads(content)
        items = response["items"]
        errors = bool(response.get("errors", True))
        if not isinstance(items, list):
            raise TypeError("items")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return Result(Outcome.RETRY, "bad_response")
    out = Items()
    if not errors and len(items) == len(docs):
        out.created = len(docs)
        return out
    for i, doc in enumerate(docs):
        item = items[i] if i < len(items) else None
        info: dict[str, Any] = {}
        if isinstance(item, dict) and item:
            first = next(iter(item.values()))
            info = first if isinstance(first, dict) else {}
        st = info.get("status")
        if not isinstance(st, int):
            out.retry_doc(doc, "missing_item")  # no answer for this document: it may or may not be there
        elif 200 <= st < 300:
            out.created += 1
        elif st == 409:
            out.duplicate += 1
        else:
            error = info.get("error")
            if not isinstance(error, dict):
                error = {"type": "unknown", "reason": str(error)}
            kind = OUTAGE_TYPES.get(str(error.get("type", "")))
            if kind is not None:  # the index or cluster refuses everything: keep the document
                out.retry_doc(doc, kind)
                out.outage = out.outage or kind
                continue
            if st == 429 or st >= 500:
                out.retry_doc(doc, "throttled" if st == 429 else "server_error")
                continue
            out.rejected.append((doc.line, {
                "_id": doc.id, "index": info.get("_index", doc.index), "status": st,
                "type": error.get("type", "unknown"), "reason": str(error.get("reason", ""))[:MAX_REASON]}))
    return out


@dataclass(slots=True)
class Tally:
    """What one attempt (one or several `_bulk` requests) did to its documents."""

    created: int = 0
    duplicate: int = 0
    retry: list[Doc] = field(default_factory=list)
    retry_reasons: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[bytes, dict[str, object]]] = field(default_factory=list)  # (record, its error)
    outage: str = ""  # the reason, when a request or an item said the destination refuses everything

    @property
    def done(self) -> int:
        return self.created + self.duplicate

    def retry_later(self, docs: Sequence[Doc], reason: str) -> None:
        self.retry.extend(docs)
        self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + len(docs)

    def add(self, items: Items) -> None:
        self.created += items.created
        self.duplicate += items.duplicate
        self.retry.extend(items.retry)
        for key, n in items.reasons.items():
            self.retry_reasons[key] = self.retry_reasons.get(key, 0) + n
        self.rejected.extend(items.rejected)
        self.outage = self.outage or items.outage
