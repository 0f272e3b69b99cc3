"""Every metric in one place, on an injectable registry (a fresh one per test).

v1's twelve names keep v1's meaning (DESIGN.md §3); `dlq_*` gained a `sink` label (and `reason`
on drops) so `sum()` over them is v1's number. New metrics follow Prometheus naming.

What is always true of a scrape:
- Every series with a bounded, known label set exists from the first scrape, at 0: the HTTP
  rejection reasons from the start, every per-sink series once the pipeline has called
  `declare_sinks` with its sinks. A series born at 1 is invisible to rate() and increase() (they
  need two samples), so alerts on the first drop or the first failed upload would miss it.
  tests/test_metrics.py checks the tables below against the label values the code uses.
- No `_created` series (prometheus_client's per-counter creation timestamps): they double the
  series count and carry nothing an alert or a dashboard uses. The switch is process-wide and is
  thrown at import, so every registry of this process, the test suite's fresh ones included,
  renders the same way.
- `process_*` (CPU, memory, file descriptors, start time of this process, from /proc) and
  `python_info` are on the same registry as the rest.
- One process is a group of one (`estat_ingest_workers` = `estat_ingest_workers_scraped` = 1); with
  `serve --workers N`, /metrics answers the merge of every worker's registry (groupmetrics.py), which
  sets both. How this registry is served is said by `group` and `public` (set by `app.serve`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.samples import Sample

from estat_ingest import __version__

# The classic text format every Prometheus version parses (generate_latest's output is valid 0.0.4
# for our metric names, which need no escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# shared with groupmetrics.py, which writes these three for a merged scrape
READY_HELP = "1 while /ready answers 200 (serve --workers: every worker's)"
WORKERS_HELP = "Processes serving the port: 1, or N with serve --workers N"
SCRAPED_HELP = "Workers whose registry this scrape read now (the others count with their last values, or are down)"

_EVENT_BUCKETS = (1, 10, 100, 500, 1000, 2000, 5000, 10_000, 50_000)
_BYTE_BUCKETS = tuple(float(2**p) for p in range(10, 31, 2))  # 1 KiB … 1 GiB
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# --- bounded label values, declared at 0 (module docstring)
# http_requests_rejected_total{reason}: http/collect.py, http/bodies.py, http/routes.py,
# http/guard.py, fastfront.py
REJECT_REASONS = (
    "too_large", "queue_full", "draining", "overloaded", "method_not_allowed", "auth_missing",
    "auth_invalid", "empty", "invalid_json", "invalid_utf8", "too_deep", "bad_encoding", "bad_body",
    "unsupported_encoding", "read_timeout", "header_timeout", "bad_http", "header_too_large",
    "server_error",
    "dlq_unavailable",  # pipeline/engine.py's held batches fill the budget (EventQueue.held_reason)
    # ACK_MODE=durable: the spool could not make a request's events durable (http/policy.py SPOOL_REFUSALS)
    "spool_no_space", "spool_read_only", "spool_permission", "spool_io_error", "spool_lease_lost", "spool_shutdown",
)
# dlq_events_dropped_total{reason}: dlq/store.py
DLQ_DROP_REASONS = ("ttl", "capacity", "corrupt", "write_error")
# dlq_batches_written_total{reason}: pipeline/engine.py
DLQ_WRITE_REASONS = ("failed", "rejected", "outage", "shutdown", "overflow")
# dlq_files_lost_total{reason}: dlq/store.py
DLQ_LOST_REASONS = ("directory_gone", "vanished")
UPLOAD_OUTCOMES = ("ok", "retry", "reject")
# upload_attempts_total{outcome, reason}: the engine's own verdicts for every sink (pipeline/engine.py,
# dlq/replayer.py), then what each sink's Result can say (sinks/<name>.py). Reasons made of data
# (the file sink's errno_<n>) appear when they happen.
ENGINE_ATTEMPTS = (("ok", "ok"), ("retry", "timeout"), ("retry", "error"))
SINK_ATTEMPTS: dict[str, tuple[tuple[str, str], ...]] = {
    "s3": (("retry", "throttled"), ("retry", "server_error"), ("retry", "connection"), ("retry", "sdk_error"),
           ("reject", "auth"), ("reject", "client_error"),
           # outages (sinks/s3.py OUTAGE_CODES): whole-bucket errors, never a verdict about a batch
           ("reject", "no_bucket"), ("reject", "wrong_region")),
    "opensearch": (("ok", "partial"), ("ok", "rejected_items"), ("retry", "throttled"), ("retry", "server_error"),
                   ("retry", "connection"), ("retry", "tls"), ("retry", "credentials"), ("retry", "bad_response"),
                   ("retry", "item_retry"), ("retry", "missing_item"), ("reject", "auth"), ("reject", "too_large"),
                   ("reject", "client_error"),
                   # outages (sinks/opensearch/items.py OUTAGE_TYPES): for the whole request (reject;
                   # a flood-stage block answers 429: retry) or for items (retry)
                   ("reject", "index_closed"), ("reject", "cluster_block"), ("reject", "index_missing"),
                   ("retry", "index_closed"), ("retry", "cluster_block"), ("retry", "index_missing")),
    "file": (("retry", "io_error"),),
}
# opensearch_items_total{outcome}: sinks/opensearch/
OPENSEARCH_ITEM_OUTCOMES = ("created", "duplicate", "retried", "rejected")
# spool_write_errors_total{reason}, spool_events_recovered_total{how}: spool/writer.py
SPOOL_WRITE_ERROR_REASONS = ("no_space", "read_only", "permission", "io_error", "lease_lost")
SPOOL_RECOVERY_HOWS = ("restart", "adoption")


class LoopCounter(Counter):
    """A Counter for the per-request hot path (measured: `inc` 0.33 µs → ≈0.05 µs; `pending += 1`
    cheaper still, no call).

    `inc` adds to `pending`, a plain number without prometheus_client's lock; the hot path may also
    add to `pending` directly. The sum is folded into the real counter whenever the value is read
    (scrape, `get_sample_value`). Increment it from the event loop's thread only (every /collect
    counter is). Unlabelled counters only.
    """

    def _metric_init(self) -> None:
        super()._metric_init()
        self.pending: float = 0

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        self.pending += amount

    def _fold(self) -> None:
        pending = self.pending
        if pending:
            self.pending = 0
            super().inc(pending)

    def _child_samples(self) -> Iterable[Sample]:
        self._fold()
        return super()._child_samples()

    def reset(self) -> None:
        self.pending = 0
        super().reset()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        # how /metrics is answered (http/policy.py `metrics_answer`): a worker of `serve --workers N`
        # reads the whole group through `group` (the parent's merge); with METRICS_ADDR, `public` is
        # False and the public port answers /metrics 404 (the separate listener serves it)
        self.group: Callable[[], Awaitable[bytes]] | None = None
        self.public = True
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        # --- v1 names, v1 meaning
        self.http_requests = LoopCounter(
            "http_requests_total", "Requests to /collect that reached the enqueue step (accepted + queue full)",
            registry=r)
        self.http_accepted = LoopCounter(
            "http_requests_accepted_total", "Requests to /collect answered 200", registry=r)
        self.http_too_large = Counter(
            "http_requests_rejected_body_too_large_total", "Requests answered 413", registry=r)
        self.http_queue_full = Counter(
            "http_requests_rejected_queue_full_total", "Requests answered 503 because the queue was full",
            registry=r)
        self.s3_events_stored = Counter(
            "s3_events_stored_total", "Events in batches stored in S3 by a fresh upload", registry=r)
        self.s3_put_errors = Counter(
            "s3_put_errors_total", "Failed S3 PutObject attempts (fresh and replay)", registry=r)
        self.dlq_enqueued = Counter(
            "dlq_events_enqueued_total", "Events written to the DLQ", ["sink"], registry=r)
        self.dlq_reuploaded = Counter(
            "dlq_events_reuploaded_total", "Events delivered from the DLQ", ["sink"], registry=r)
        self.dlq_dropped = Counter(
            "dlq_events_dropped_total", "Events deleted without delivery (ttl, capacity, corrupt, write_error)",
            ["sink", "reason"], registry=r)
        self.dlq_expired = Counter(
            "dlq_files_expired_total", "DLQ files deleted by TTL or capacity eviction", ["sink"], registry=r)
        self.dlq_files = Gauge("dlq_files_current", "DLQ data files on disk", ["sink"], registry=r)
        self.dlq_bytes = Gauge("dlq_size_bytes", "Bytes of DLQ data files on disk", ["sink"], registry=r)

        # --- new
        self.build_info = Gauge("estat_ingest_build_info", "Build information", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.ready = Gauge("ingest_ready", READY_HELP, registry=r)
        self.workers = Gauge("estat_ingest_workers", WORKERS_HELP, registry=r)
        self.workers.set(1)
        self.workers_scraped = Gauge("estat_ingest_workers_scraped", SCRAPED_HELP, registry=r)
        self.workers_scraped.set(1)
        self.rejected = Counter(
            "http_requests_rejected_total", "Requests to /collect answered 4xx/5xx, by reason", ["reason"],
            registry=r)
        self.api_key_requests = Counter(
            "http_requests_api_key_total", "Accepted /collect requests by API key name (never the key)",
            ["key_name"], registry=r)
        self.events_accepted = LoopCounter(
            "ingest_events_accepted_total", "Events accepted (NDJSON requests carry several)", registry=r)
        self.queue_depth = Gauge("ingest_queue_depth_events", "Events waiting between HTTP and batchers",
                                 registry=r)
        self.queue_capacity = Gauge("ingest_queue_capacity_events", "CHANNEL_SIZE", registry=r)
        self.buffer_bytes = Gauge(
            "ingest_buffer_bytes", "Bytes of accepted events held in memory, not yet delivered or spilled "
            "(counted once per sink)", registry=r)
        self.buffer_capacity = Gauge("ingest_buffer_capacity_bytes", "BUFFER_MAX_BYTES", registry=r)
        self.upload_queue_depth = Gauge(
            "upload_queue_depth_batches", "Closed batches waiting for an uploader", ["sink"], registry=r)
        self.batch_events = Histogram(
            "batch_events", "Events per closed batch", ["sink"], buckets=_EVENT_BUCKETS, registry=r)
        self.batch_bytes = Histogram(
            "batch_bytes", "Uncompressed JSONL bytes per closed batch", ["sink"], buckets=_BYTE_BUCKETS,
            registry=r)
        self.batch_compressed_bytes = Histogram(
            "batch_compressed_bytes", "Compressed bytes per batch payload", ["sink"], buckets=_BYTE_BUCKETS,
            registry=r)
        self.upload_duration = Histogram(
            "upload_duration_seconds", "One delivery attempt, by sink and outcome", ["sink", "outcome"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.upload_attempts = Counter(
            "upload_attempts_total", "Delivery attempts by sink, outcome and reason",
            ["sink", "outcome", "reason"], registry=r)
        self.events_delivered = Counter(
            "events_delivered_total", "Events delivered to a sink (fresh and replayed)", ["sink"], registry=r)
        self.dlq_writes = Counter(
            "dlq_batches_written_total", "Batches written to the DLQ, by why", ["sink", "reason"], registry=r)
        self.dlq_write_errors = Counter(
            "dlq_write_errors_total", "DLQ writes that failed (disk full, EIO)", ["sink"], registry=r)
        self.dlq_oldest_age = Gauge(
            "dlq_oldest_file_age_seconds", "Age of the oldest DLQ file", ["sink"], registry=r)
        self.dlq_lost = Counter(
            "dlq_files_lost_total", "DLQ files this process knew that left the disk without it: directory_gone (the "
            "directory disappeared), vanished (deleted by hand, or taken by another process sharing it)",
            ["sink", "reason"], registry=r)
        self.dlq_unavailable = Gauge(
            "dlq_unavailable", "1 while the sink's DLQ refuses batches the sink did not take (no space, read-only, "
            "no permission, full with DLQ_WHEN_FULL=reject): they are held in memory, and /collect answers 503 "
            "dlq_unavailable once they fill BUFFER_MAX_BYTES", ["sink"], registry=r)
        self.held_events = Gauge(
            "ingest_held_events", "Events of batches neither the sink nor the DLQ took, held in memory and offered "
            "again", ["sink"], registry=r)
        self.dlq_rejected = Counter(
            "dlq_events_rejected_total", "DLQ events the sink rejected for good, moved to DLQ_PREFIX or rejected/",
            ["sink"], registry=r)
        # --- the durable spool (ACK_MODE=durable)
        self.spool_fsync_seconds = Histogram(
            "spool_fsync_seconds", "One group commit: every dirty batch's member written and fdatasynced",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.spool_files = Gauge("spool_files", "Open batches with a spool file of this process", registry=r)
        self.spool_bytes = Gauge("spool_bytes", "Bytes of this process's spool files not yet delivered or "
                                 "moved into the DLQ", registry=r)
        self.spool_write_errors = Counter(
            "spool_write_errors_total", "Group commits that failed (their requests got 503), by reason",
            ["reason"], registry=r)
        self.spool_recovered = Counter(
            "spool_events_recovered_total", "Events found in the spool of a dead process and moved into the "
            "DLQ: our own earlier run (restart) or a peer sharing DLQ_DIR (adoption)", ["how"], registry=r)
        self.spool_torn_bytes = Counter(
            "spool_torn_bytes_total", "Bytes cut off the end of recovered spool files (never acknowledged)",
            registry=r)
        # --- OpenSearch, per _bulk item (not per request)
        self.opensearch_items = Counter(
            "opensearch_items_total",
            "OpenSearch _bulk items by outcome: created, duplicate (409 on create = already indexed), "
            "retried (item 429/5xx, sent again alone), rejected (item 4xx or invalid record → DLQ)",
            ["outcome"], registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in SPOOL_WRITE_ERROR_REASONS:
            self.spool_write_errors.labels(reason)
        for how in SPOOL_RECOVERY_HOWS:
            self.spool_recovered.labels(how)

    def declare_sinks(self, names: Iterable[str]) -> None:
        """Create every per-sink series at 0 (idempotent): v1's DLQ names and the rest."""
        for sink in names:
            for per_sink in (self.dlq_enqueued, self.dlq_reuploaded, self.dlq_expired, self.dlq_files,
                             self.dlq_bytes, self.dlq_oldest_age, self.dlq_write_errors, self.dlq_rejected,
                             self.events_delivered, self.upload_queue_depth, self.batch_events, self.batch_bytes,
                             self.batch_compressed_bytes):
                per_sink.labels(sink)
            for reason in DLQ_DROP_REASONS:
                self.dlq_dropped.labels(sink, reason)
            for reason in DLQ_WRITE_REASONS:
                self.dlq_writes.labels(sink, reason)
            for reason in DLQ_LOST_REASONS:
                self.dlq_lost.labels(sink, reason)
            self.dlq_unavailable.labels(sink).set(0)
            self.held_events.labels(sink).set(0)
            for outcome in UPLOAD_OUTCOMES:
                self.upload_duration.labels(sink, outcome)
            for outcome, reason in ENGINE_ATTEMPTS + SINK_ATTEMPTS.get(sink, ()):
                self.upload_attempts.labels(sink, outcome, reason)
            if sink == "opensearch":
                for outcome in OPENSEARCH_ITEM_OUTCOMES:
                    self.opensearch_items.labels(outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)
