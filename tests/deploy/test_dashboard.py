"""deploy/grafana/dashboard.json: valid, laid out, and every query uses exported metrics correctly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from known_metrics import metric_names, problems

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"

# topic the issue asks for -> series one of the panels must query
REQUIRED = {
    "ingest rate": "ingest_events_accepted_total",
    "rejections by reason": "http_requests_rejected_total",
    "queue depth": "ingest_queue_depth_events",
    "batch sizes": "batch_events_bucket",
    "upload latency": "upload_duration_seconds_bucket",
    "DLQ depth": "dlq_files_current",
    "DLQ age": "dlq_oldest_file_age_seconds",
    "drops": "dlq_events_dropped_total",
    "CPU": "process_cpu_seconds_total",
    "memory": "process_resident_memory_bytes",
    "spool fsync latency": "spool_fsync_seconds_bucket",
    "spool size": "spool_bytes",
    "spool errors": "spool_write_errors_total",
    "spool recoveries": "spool_events_recovered_total",
    "spool torn bytes": "spool_torn_bytes_total",
}

GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict]:
    out = []
    for p in _dash()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def _targets() -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in _panels() for t in p.get("targets", [])]


def _as_promql(expr: str) -> str:
    """Grafana variables replaced so that the expression is plain PromQL."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def test_top_level_fields() -> None:
    d = _dash()
    assert d["uid"] == "estat-ingest"
    assert d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    names = {v["name"]: v for v in d["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    for var in ("instance", "sink"):
        q = names[var]["query"]["query"]
        assert q.startswith("label_values("), q
        assert problems(q.removeprefix("label_values(").split(",")[0]) == [], q


def test_panel_ids_unique_and_grid_does_not_overlap() -> None:
    panels = _panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_panel_is_complete() -> None:
    for p in _panels():
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_expression_uses_exported_metrics_correctly() -> None:
    targets = _targets()
    assert len(targets) >= 20
    for title, t in targets:
        assert problems(_as_promql(t["expr"])) == [], f"{title}: {t['expr']}"


def test_instance_filter_everywhere() -> None:
    for title, t in _targets():
        assert 'instance=~"$instance"' in t["expr"], f"{title}: not filtered by $instance: {t['expr']}"


def test_required_topics_have_panels() -> None:
    queried = set().union(*(metric_names(_as_promql(t["expr"])) for _, t in _targets()))
    missing = {topic: series for topic, series in REQUIRED.items() if series not in queried}
    assert not missing


def test_cpu_and_memory_panels_read_the_process_metrics() -> None:
    """CPU is the rate of the CPU-seconds counter (in cores); memory is the resident set size."""
    by_title = {title: " ".join(t["expr"] for tt, t in _targets() if tt == title) for title, _ in _targets()}
    panels = {p["title"]: p for p in _panels()}
    assert "rate(process_cpu_seconds_total{" in by_title["CPU"]
    assert "process_resident_memory_bytes{" in by_title["Memory (RSS)"]
    assert panels["Memory (RSS)"]["fieldConfig"]["defaults"]["unit"] == "bytes"


def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`); PromQL syntax check skipped")
    rules = [{"record": f"dashboard:query_{i}", "expr": _as_promql(t["expr"])} for i, (_, t) in enumerate(_targets())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
