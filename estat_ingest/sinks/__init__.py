"""Sinks by name, imported lazily (aiobotocore loads only when an s3 sink is configured)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from estat_ingest.config import Settings
    from estat_ingest.metrics import Metrics
    from estat_ingest.sinks.base import Sink

REGISTRY = {
    "s3": "estat_ingest.sinks.s3:S3Sink",
    "file": "estat_ingest.sinks.file:FileSink",
    "opensearch": "estat_ingest.sinks.opensearch:OpenSearchSink",
    "memory": "estat_ingest.sinks.memory:MemorySink",
}


def build_sink(name: str, settings: Settings, metrics: Metrics | None = None) -> Sink:
    module, _, attr = REGISTRY[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    sink: Sink = cls(settings, metrics)
    return sink
