"""known_metrics.py (what deploy/ and docs reference) must equal what the code registers."""

from __future__ import annotations

import pytest
from known_metrics import COUNTERS, GAUGES, HISTOGRAMS, KNOWN_METRICS, V1_METRICS, problems

prometheus_client = pytest.importorskip("prometheus_client")


def _registered() -> dict[str, tuple[str, frozenset[str]]]:
    """Metric objects of Metrics() with their label names, then the collectors' families on its
    registry (process_*, python_info) with the label names of their samples."""
    from estat_ingest.metrics import Metrics

    m = Metrics()
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for obj in vars(m).values():
        if isinstance(obj, prometheus_client.metrics.MetricWrapperBase):
            kind = obj._type
            name = obj._name + "_total" if kind == "counter" else obj._name
            out[name] = (kind, frozenset(obj._labelnames))
    for family in m.registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        out.setdefault(name, (family.type, frozenset(k for s in family.samples for k in s.labels)))
    return out


def test_process_metrics_are_collected() -> None:
    registered = _registered()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert name in registered, f"{name} not on Metrics().registry (ProcessCollector/PlatformCollector)"


def test_known_metrics_are_the_registered_ones() -> None:
    registered = _registered()
    assert set(registered) == set(KNOWN_METRICS), (
        f"only in code: {sorted(set(registered) - KNOWN_METRICS)}; "
        f"only in known_metrics.py: {sorted(KNOWN_METRICS - set(registered))}")


@pytest.mark.parametrize(("table", "kind"), [(COUNTERS, "counter"), (GAUGES, "gauge"), (HISTOGRAMS, "histogram")])
def test_types_and_labels_match_the_code(table: dict[str, frozenset[str]], kind: str) -> None:
    registered = _registered()
    for name, labels in table.items():
        assert name in registered, name
        assert registered[name] == (kind, labels), f"{name}: code has {registered[name]}, expected {(kind, labels)}"


def test_v1_names_are_kept() -> None:
    assert V1_METRICS <= KNOWN_METRICS
    assert len(V1_METRICS) == 12


def test_promql_reader_catches_mistakes() -> None:
    assert problems('sum by (sink) (rate(upload_attempts_total{outcome!="ok"}[5m]))') == []
    assert problems("rate(dlq_files_current[5m])") == ["rate() over dlq_files_current, which is not a counter"]
    assert problems("nope_total") == ["unknown metric 'nope_total'"]
    assert problems("sum by (reason) (rate(http_requests_total[5m]))") == [
        "label 'reason' is not on any of ['http_requests_total']"]
    assert problems("histogram_quantile(0.9, sum(rate(batch_events_bucket[5m])))") == [
        "histogram_quantile needs `by (le, ...)`"]
    assert problems("batch_events") == ["batch_events is a histogram: select batch_events_bucket, _sum or _count"]
