"""What a batch is on disk and on the wire, shared by the pipeline, the sinks and the DLQ.

`keys`: v1's object names, partitions and keys. `codec`: gzip/zstd encoding of JSONL lines and the
full-stream verification every reader of a batch uses (DLQ replay, `dlq verify`, the sinks).
Nothing here imports another part of the package, so every layer above may use it.
"""
