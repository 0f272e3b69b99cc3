"""estat-ingest: HTTP event ingest → batched JSONL (gzip/zstd) → S3, OpenSearch or files."""

__version__ = "2.0.0"
