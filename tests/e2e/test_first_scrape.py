"""The first scrape of a real `estat-ingest serve` (both HTTP fronts) with the s3, opensearch and
file sinks: v1's DLQ names for every sink and every drop reason, and the other bounded series,
all at 0 (a series born at 1 is invisible to rate() and increase()); process metrics; no
`_created` series; and `promtool check metrics` accepts the text.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from estat_ingest import metrics as metrics_mod
from tests.fake_opensearch import FakeOpenSearch
from tests.helpers import ServerProcess, http, s3_client

FRONTS = ("aiohttp", "fast")

SINKS = ("s3", "opensearch", "file")
# DESIGN.md §3 and dlq/store.py, written out rather than imported from metrics.py, so a reason or
# a name dropped there fails here
V1_DROP_REASONS = ("ttl", "capacity", "corrupt", "write_error")
V1_PER_SINK = ("dlq_events_enqueued_total", "dlq_events_reuploaded_total", "dlq_files_expired_total",
               "dlq_files_current", "dlq_size_bytes")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def first_scrape(tmp_path_factory: pytest.TempPathFactory, moto: Any, front: str) -> Iterator[tuple[str, str]]:
    """(front, body of the first GET /metrics) of a server with the s3, opensearch and file sinks."""
    tmp = tmp_path_factory.mktemp(f"first-scrape-{front}")
    s3_client(moto.endpoint).create_bucket(Bucket=f"first-scrape-{front}")
    fake = FakeOpenSearch().start()
    srv = ServerProcess({
        "SINKS": ",".join(SINKS), "RAW_BUCKET": f"first-scrape-{front}", "S3_ENDPOINT_URL": moto.endpoint,
        "AWS_REGION": "us-east-1", "OPENSEARCH_URL": fake.url, "FILE_SINK_DIR": str(tmp / "data"),
        "DLQ_DIR": str(tmp / "dlq"),
    }, tmp)
    try:
        srv.start()
        status, headers, body = http("GET", srv.url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        yield front, body.decode()
    finally:
        try:
            if srv.proc is not None and srv.proc.poll() is None:
                assert srv.stop(30) == 0, srv.log()
        finally:
            srv.kill()
            fake.stop()


def test_first_scrape_has_v1_dlq_series_at_zero_for_every_sink(first_scrape: tuple[str, str]) -> None:
    samples = scrape_samples(first_scrape[1])
    wrong = []
    for sink in SINKS:
        for name in V1_PER_SINK:
            if value(samples, name, sink=sink) != 0:
                wrong.append(f"{name}{{sink={sink!r}}} = {value(samples, name, sink=sink)}")
        for reason in sorted(V1_DROP_REASONS):
            v = value(samples, "dlq_events_dropped_total", sink=sink, reason=reason)
            if v != 0:
                wrong.append(f"dlq_events_dropped_total{{sink={sink!r}, reason={reason!r}}} = {v}")
    assert not wrong, "\n".join(wrong)
    # and no series for a sink that is not configured
    assert not [k for k in samples if dict(k[1]).get("sink") not in (None, *SINKS)]


def test_first_scrape_has_the_other_bounded_series_at_zero(first_scrape: tuple[str, str]) -> None:
    samples = scrape_samples(first_scrape[1])
    expected: list[tuple[str, dict[str, str]]] = []
    expected += [("http_requests_rejected_total", {"reason": r}) for r in metrics_mod.REJECT_REASONS]
    expected += [("opensearch_items_total", {"outcome": o}) for o in metrics_mod.OPENSEARCH_ITEM_OUTCOMES]
    expected += [("spool_write_errors_total", {"reason": r}) for r in metrics_mod.SPOOL_WRITE_ERROR_REASONS]
    expected += [("spool_events_recovered_total", {"how": h}) for h in metrics_mod.SPOOL_RECOVERY_HOWS]
    for sink in SINKS:
        expected += [("upload_attempts_total", {"sink": sink, "outcome": o, "reason": r})
                     for o, r in metrics_mod.ENGINE_ATTEMPTS + metrics_mod.SINK_ATTEMPTS[sink]]
        expected += [("dlq_batches_written_total", {"sink": sink, "reason": r}) for r in metrics_mod.DLQ_WRITE_REASONS]
        expected += [(n, {"sink": sink}) for n in ("events_delivered_total", "dlq_write_errors_total",
                                                   "dlq_events_rejected_total", "batch_events_count",
                                                   "dlq_oldest_file_age_seconds")]
        expected += [("upload_duration_seconds_count", {"sink": sink, "outcome": o})
                     for o in metrics_mod.UPLOAD_OUTCOMES]
    assert len(expected) > 80
    wrong = [f"{n}{labels} = {value(samples, n, **labels)}" for n, labels in expected
             if value(samples, n, **labels) != 0]
    assert not wrong, "\n".join(wrong)
    # outcome "ok" is reason "ok", as the engine labels a success
    assert value(samples, "upload_attempts_total", sink="s3", outcome="ok", reason="ok") == 0


def test_first_scrape_has_process_metrics_and_no_created(first_scrape: tuple[str, str]) -> None:
    text = first_scrape[1]
    samples = scrape_samples(text)
    assert not [k[0] for k in samples if k[0].endswith("_created")]
    cpu = value(samples, "process_cpu_seconds_total")
    rss = value(samples, "process_resident_memory_bytes")
    assert cpu is not None and cpu > 0  # the server has imported and started: it used CPU
    assert rss is not None and rss > 10 * 1024**2
    assert (value(samples, "process_open_fds") or 0) > 0
    assert "# TYPE process_cpu_seconds_total counter" in text


def test_promtool_check_metrics_accepts_the_scrape(first_scrape: tuple[str, str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; `make test` installs it); "
                    "/metrics lint skipped")
    out = subprocess.run([promtool, "check", "metrics"], input=first_scrape[1], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # promtool lints what it is given: a broken exposition is refused (so a pass above means something)
    bad = subprocess.run([promtool, "check", "metrics"], input="# TYPE x counter\nx_created 1\nx 1\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
