"""The OpenSearch sink, by role: `sink` (one attempt = one or more `_bulk` requests), `documents`
(record → `create` action + document), `items` (what a `_bulk` answer means, pure), `nodes`
(round-robin with cooldown), `sigv4` (AWS request signing). docs/opensearch.md has the behaviour."""

from estat_ingest.sinks.opensearch.documents import rejected_name
from estat_ingest.sinks.opensearch.nodes import Nodes
from estat_ingest.sinks.opensearch.sink import OpenSearchSink

__all__ = ["Nodes", "OpenSearchSink", "rejected_name"]
