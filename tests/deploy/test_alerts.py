"""deploy/prometheus/alerts.yml: structure, metric names, runbook links, promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from known_metrics import metric_names, problems

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
ALERTS = PROM / "alerts.yml"
RUNBOOK = "https://github.com/estat/estat-ingest/blob/main/docs/ops.md#"

# alert -> (runbook anchor, metric it must watch, text that must be in the expression)
EXPECTED = {
    "EstatIngestDLQBacklog": ("dlq-backlog", "dlq_files_current", "sum by (instance) (dlq_files_current) > 1000"),
    "EstatIngestEventsDropped": ("events-dropped", "dlq_events_dropped_total",
                                 "increase(dlq_events_dropped_total[5m])) > 0"),
    "EstatIngestQueueFull": ("queue-full", "http_requests_rejected_queue_full_total",
                             "rate(http_requests_rejected_queue_full_total[5m])) > 0"),
    "EstatIngestUploadErrors": ("upload-errors", "upload_attempts_total", 'upload_attempts_total{outcome!="ok"}'),
    "EstatIngestDLQOldestFile": ("dlq-oldest-file", "dlq_oldest_file_age_seconds", "> 3600"),
    "EstatIngestNotReady": ("not-ready", "ingest_ready", "(ingest_ready) == 0"),
    "EstatIngestDown": ("target-down", "up", 'up{job="estat-ingest"} == 0'),
}


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert list(doc) == ["groups"]
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert all("alert" in r for r in rules), "recording rules do not belong in alerts.yml"
    return rules


def _duration_s(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    assert text[-1] in units and text[:-1].isdigit(), text
    return int(text[:-1]) * units[text[-1]]


def test_exactly_the_expected_alerts() -> None:
    names = [r["alert"] for r in _rules()]
    assert len(names) == len(set(names)), names
    assert set(names) == set(EXPECTED)


@pytest.mark.parametrize("alert", sorted(EXPECTED))
def test_alert_watches_its_metric_and_links_its_runbook(alert: str) -> None:
    anchor, metric, fragment = EXPECTED[alert]
    rule = next(r for r in _rules() if r["alert"] == alert)
    expr = " ".join(rule["expr"].split())
    assert metric in metric_names(expr)
    assert fragment in expr, f"{alert}: {fragment!r} not in {expr!r}"
    ann = rule["annotations"]
    assert ann["runbook_url"] == RUNBOOK + anchor
    assert ann["summary"].strip() and ann["description"].strip()
    assert rule["labels"]["severity"] in {"warning", "critical"}


def test_every_expression_uses_exported_metrics_correctly() -> None:
    for rule in _rules():
        assert problems(rule["expr"]) == [], rule["alert"]


def test_sustained_alerts_wait_and_loss_pages_at_once() -> None:
    rules = {r["alert"]: r for r in _rules()}
    # data loss: no `for`, critical
    assert "for" not in rules["EstatIngestEventsDropped"]
    assert rules["EstatIngestEventsDropped"]["labels"]["severity"] == "critical"
    # a drain makes an instance unready for at most SHUTDOWN_TIMEOUT (25s): must not page
    assert _duration_s(rules["EstatIngestNotReady"]["for"]) >= 300
    assert _duration_s(rules["EstatIngestQueueFull"]["for"]) >= 300
    assert _duration_s(rules["EstatIngestDLQBacklog"]["for"]) >= 300
    # upload error ratio: a fraction, not a count
    expr = rules["EstatIngestUploadErrors"]["expr"]
    assert "/" in expr
    threshold = float(expr.rsplit(">", 1)[1])
    assert 0 < threshold < 1


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package `prometheus`: "
                    "apt-get install -y --no-install-recommends prometheus); promtool checks skipped")
    return path


def test_promtool_check_rules() -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in out.stdout


def test_promtool_unit_tests_fire_each_alert() -> None:
    """alerts_test.yml feeds series to every alert and checks when it fires and what it says."""
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert tested == set(EXPECTED), f"alerts without a firing unit test: {sorted(set(EXPECTED) - tested)}"
    out = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
