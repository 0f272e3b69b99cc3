"""The metrics estat-ingest exports, and a small PromQL reader to check expressions against them.

KNOWN_METRICS holds base names as registered in the code (counters with `_total`, histograms
without their `_bucket`/`_sum`/`_count` series). The alert, dashboard and docs tests import it;
test_known_metrics.py keeps it equal to estat_ingest/metrics.py.
"""

from __future__ import annotations

import re

# name -> label names (without the target labels Prometheus adds: instance, job)
COUNTERS: dict[str, frozenset[str]] = {
    # v1
    "http_requests_total": frozenset(),
    "http_requests_accepted_total": frozenset(),
    "http_requests_rejected_body_too_large_total": frozenset(),
    "http_requests_rejected_queue_full_total": frozenset(),
    "s3_events_stored_total": frozenset(),
    "s3_put_errors_total": frozenset(),
    "dlq_events_enqueued_total": frozenset({"sink"}),
    "dlq_events_reuploaded_total": frozenset({"sink"}),
    "dlq_events_dropped_total": frozenset({"sink", "reason"}),
    "dlq_files_expired_total": frozenset({"sink"}),
    # new
    "http_requests_rejected_total": frozenset({"reason"}),
    "ingest_events_accepted_total": frozenset(),
    "upload_attempts_total": frozenset({"sink", "outcome", "reason"}),
    "events_delivered_total": frozenset({"sink"}),
    "dlq_batches_written_total": frozenset({"sink", "reason"}),
    "dlq_write_errors_total": frozenset({"sink"}),
    "dlq_events_rejected_total": frozenset({"sink"}),
    "dlq_files_lost_total": frozenset({"sink", "reason"}),
    "http_requests_api_key_total": frozenset({"key_name"}),
    "opensearch_items_total": frozenset({"outcome"}),
    # durable spool (ACK_MODE=durable)
    "spool_write_errors_total": frozenset({"reason"}),
    "spool_events_recovered_total": frozenset({"how"}),
    "spool_torn_bytes_total": frozenset(),
    # prometheus_client's process collector (this process, from /proc)
    "process_cpu_seconds_total": frozenset(),
}
GAUGES: dict[str, frozenset[str]] = {
    # v1
    "dlq_files_current": frozenset({"sink"}),
    "dlq_size_bytes": frozenset({"sink"}),
    # new
    "estat_ingest_build_info": frozenset({"version"}),
    "ingest_ready": frozenset(),
    "estat_ingest_workers": frozenset(),
    "estat_ingest_workers_scraped": frozenset(),
    "ingest_queue_depth_events": frozenset(),
    "ingest_queue_capacity_events": frozenset(),
    "ingest_buffer_bytes": frozenset(),
    "ingest_buffer_capacity_bytes": frozenset(),
    "upload_queue_depth_batches": frozenset({"sink"}),
    "dlq_oldest_file_age_seconds": frozenset({"sink"}),
    "dlq_unavailable": frozenset({"sink"}),
    "ingest_held_events": frozenset({"sink"}),
    "spool_files": frozenset(),
    "spool_bytes": frozenset(),
    # prometheus_client's process and platform collectors
    "process_resident_memory_bytes": frozenset(),
    "process_virtual_memory_bytes": frozenset(),
    "process_start_time_seconds": frozenset(),
    "process_open_fds": frozenset(),
    "process_max_fds": frozenset(),
    "python_info": frozenset({"implementation", "major", "minor", "patchlevel", "version"}),
}
HISTOGRAMS: dict[str, frozenset[str]] = {
    "batch_events": frozenset({"sink"}),
    "batch_bytes": frozenset({"sink"}),
    "batch_compressed_bytes": frozenset({"sink"}),
    "upload_duration_seconds": frozenset({"sink", "outcome"}),
    "spool_fsync_seconds": frozenset(),
}

V1_METRICS = frozenset({
    "http_requests_total", "http_requests_accepted_total", "http_requests_rejected_body_too_large_total",
    "http_requests_rejected_queue_full_total", "s3_events_stored_total", "s3_put_errors_total",
    "dlq_events_enqueued_total", "dlq_events_reuploaded_total", "dlq_events_dropped_total",
    "dlq_files_expired_total", "dlq_files_current", "dlq_size_bytes",
})

KNOWN_METRICS: frozenset[str] = frozenset(COUNTERS) | frozenset(GAUGES) | frozenset(HISTOGRAMS)

# labels every scraped series carries
TARGET_LABELS = frozenset({"instance", "job"})
# series Prometheus itself writes for every scrape target
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {"up": frozenset()}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def series_labels(name: str) -> frozenset[str] | None:
    """Labels of an exposed series name (histograms by their _bucket/_sum/_count), None if unknown."""
    for table in (COUNTERS, GAUGES, PROMETHEUS_SERIES):
        if name in table:
            return table[name] | TARGET_LABELS
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in HISTOGRAMS:
            extra = {"le"} if suffix == "_bucket" else set()
            return HISTOGRAMS[base] | TARGET_LABELS | extra
    return None


def is_counter_like(name: str) -> bool:
    """Series that only go up (so rate/increase make sense)."""
    return name in COUNTERS or any(
        name.endswith(s) and name.removesuffix(s) in HISTOGRAMS for s in HISTOGRAM_SUFFIXES)


# ------------------------------------------------------------------------------------------------
# A deliberately small PromQL reader: enough for the expressions in deploy/, not a parser.

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")
_RATE_ARG = re.compile(r"\b(rate|irate|increase|resets)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")
_GAUGE_FUNCS = re.compile(r"\b(delta|deriv|predict_linear|idelta)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
    "group_right", "inf", "nan", "atan2", "Inf", "NaN",
})


def _strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects."""
    s = _strip_strings(expr)
    s = _MATCHERS.sub(" ", s)
    s = _RANGE.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    return {m.group(1) for m in _IDENT.finditer(s) if m.group(1) not in _KEYWORDS}


def grouping_labels(expr: str) -> set[str]:
    s = _strip_strings(expr)
    out: set[str] = set()
    for m in _GROUPING.finditer(s):
        out.update(x.strip() for x in m.group(2).split(",") if x.strip())
    return out


def matcher_labels(expr: str) -> set[str]:
    s = _strip_strings(expr)
    out: set[str] = set()
    for m in _MATCHERS.finditer(s):
        out.update(_MATCHER_LABEL.findall(m.group(1)))
    return out


def problems(expr: str) -> list[str]:
    """What is wrong with an expression with respect to the exported metrics ([] = nothing)."""
    found: list[str] = []
    names = metric_names(expr)
    if not names:
        found.append(f"no metric found in {expr!r}")
    labels_available: set[str] = set()
    for name in sorted(names):
        labels = series_labels(name)
        if labels is None:
            if name in HISTOGRAMS:
                found.append(f"{name} is a histogram: select {name}_bucket, _sum or _count")
            else:
                found.append(f"unknown metric {name!r}")
            continue
        labels_available |= labels
    s = _strip_strings(expr)
    for func, name in _RATE_ARG.findall(s):
        if series_labels(name) is not None and not is_counter_like(name):
            found.append(f"{func}() over {name}, which is not a counter")
    for func, name in _GAUGE_FUNCS.findall(s):
        if is_counter_like(name):
            found.append(f"{func}() over counter {name}: use rate() or increase()")
    if "histogram_quantile" in s:
        if not any(n.endswith("_bucket") for n in names):
            found.append("histogram_quantile without a _bucket series")
        if "le" not in grouping_labels(expr):
            found.append("histogram_quantile needs `by (le, ...)`")
    if labels_available:
        for label in sorted((grouping_labels(expr) | matcher_labels(expr)) - labels_available):
            found.append(f"label {label!r} is not on any of {sorted(names)}")
    return found
