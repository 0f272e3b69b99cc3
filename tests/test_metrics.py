"""The label values estat_ingest/metrics.py declares at 0 are the ones the code uses; fresh
registries have process metrics and no `_created` series.

The declared values must cover every label value the code writes as a literal, read from the
source: `.labels(..., "x")` anywhere in the package, and the reasons that reach a label through a
variable (HTTP rejections, DLQ write reasons, sinks' `Result(Outcome.X, "reason")`, OpenSearch
item outcomes). What a real server's first scrape shows: tests/e2e/test_first_scrape.py.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from estat_ingest import metrics as metrics_mod
from estat_ingest.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "estat_ingest"
SINKS = ("s3", "opensearch", "file")
# DESIGN.md §3 and dlq/store.py: the reasons of v1's dlq_events_dropped_total, written out here
# rather than imported, so a reason removed from metrics.py fails this test
V1_DROP_REASONS = {"ttl", "capacity", "corrupt", "write_error"}


# ------------------------------------------------------------------------------------ source scans


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _strings(node: ast.AST) -> set[str]:
    """Every string constant inside an expression (`"a" if x else "b"` → both), f-strings aside
    (a value made of data, such as `errno_<n>`, is not a declared one)."""
    if isinstance(node, ast.JoinedStr):
        return set()
    if isinstance(node, ast.Constant):
        return {node.value} if isinstance(node.value, str) else set()
    return set().union(*(_strings(child) for child in ast.iter_child_nodes(node)))


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def literal_label_values(paths: list[Path]) -> dict[str, set[tuple[int, str]]]:
    """Metrics attribute → {(label position, value)} for each `….<attr>.labels(…, "value", …)`."""
    out: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for path in paths:
        for node in ast.walk(_tree(path)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "labels"
                    and isinstance(node.func.value, ast.Attribute)):
                for i, arg in enumerate(node.args):
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        out[node.func.value.attr].add((i, arg.value))
    return out


# call name → index of the argument that carries a rejection reason
REASON_ARG = {"Refusal": 1, "_protocol_error": 1, "BodyError": 1}


def _assigns_reason(node: ast.AST) -> bool:
    return isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "reason" for t in node.targets)


def rejection_reasons(paths: list[Path]) -> set[str]:
    """Reasons the HTTP fronts can put on http_requests_rejected_total: the reason argument of
    Refusal()/_protocol_error()/BodyError(), `reason = "..."`, and the `(None, "...")`
    verdicts of the body validators."""
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and _call_name(node) in REASON_ARG:
                i = REASON_ARG[_call_name(node)]
                if len(node.args) > i:
                    found |= _strings(node.args[i])
            elif isinstance(node, ast.Assign) and _assigns_reason(node):
                found |= _strings(node.value)
            elif (isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and len(node.value.elts) == 2
                  and isinstance(node.value.elts[0], ast.Constant) and node.value.elts[0].value is None):
                found |= _strings(node.value.elts[1])
    return found


def _assigned(tree: ast.Module) -> dict[str, set[str]]:
    """Name → the string constants of every value assigned to it in the module."""
    out: dict[str, set[str]] = defaultdict(set)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] |= _strings(node.value)
    return out


def dlq_write_reasons(path: Path) -> set[str]:
    """The `reason` of every DLQ write in the engine: `_spill(lane, payload, <reason>)`, where the
    reason is a literal, a name assigned in the module, or a lookup in a table (`TABLE[key]`)
    assigned in the module."""
    tree = _tree(path)
    assigned = _assigned(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) == "_spill" and len(node.args) == 3:
            arg = node.args[2]
            if isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
                found |= assigned[arg.value.id]
            elif isinstance(arg, ast.Name):
                found |= assigned[arg.id]
            else:
                found |= _strings(arg)
    return found


def result_verdicts(path: Path) -> set[tuple[str | None, str]]:
    """(outcome, reason) of every `Result(Outcome.X, reason)` in a module: outcome None when it is
    a variable; a reason given by a name is resolved through the module's assignments to it; an
    empty reason is the outcome itself (the engine labels `result.reason or outcome`)."""
    tree = _tree(path)
    assigned = _assigned(tree)
    out: set[tuple[str | None, str]] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _call_name(node) == "Result" and node.args):
            continue
        first = node.args[0]
        outcome = (first.attr.lower() if isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)
                   and first.value.id == "Outcome" else None)
        reasons: set[str] = set()
        if len(node.args) > 1:
            expr = node.args[1]
            reasons = assigned[expr.id] if isinstance(expr, ast.Name) else _strings(expr)
        else:
            reasons = {""}
        for reason in reasons:
            if reason == "" and outcome is None:
                continue
            out.add((outcome, reason or outcome or ""))
    return out


def sink_files(name: str) -> list[Path]:
    """The source of a sink: its module, or every module of its package."""
    from estat_ingest.sinks import REGISTRY

    base = ROOT / REGISTRY[name].partition(":")[0].replace(".", "/")
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    assert files and all(f.is_file() for f in files), f"no source for sink {name!r} at {base}"
    return files


# where the engine's own verdicts are made (timeouts, a sink that raised), whichever exist
ENGINE_FILES = [p for p in (PKG / "delivery.py", PKG / "pipeline" / "engine.py", PKG / "dlq" / "replayer.py")
                if p.is_file()]


def declared() -> Metrics:
    m = Metrics()
    m.declare_sinks(SINKS)
    return m


def children(m: Metrics) -> dict[str, set[tuple[str, ...]]]:
    """Metrics attribute → the label-value tuples it has children for."""
    return {attr: set(obj._metrics) for attr, obj in vars(m).items()
            if isinstance(obj, MetricWrapperBase) and obj._labelnames}


# ------------------------------------------------------------------------------------ 1. tables vs code


def test_every_literal_label_value_in_the_code_is_declared() -> None:
    paths = [p for p in PKG.rglob("*.py") if p.name != "metrics.py"]
    literal = literal_label_values(paths)
    # the scan finds what it should (a broken scan must not pass vacuously)
    assert (1, "corrupt") in literal["dlq_dropped"] and (0, "header_timeout") in literal["rejected"]
    have = children(declared())
    missing = []
    for attr, uses in sorted(literal.items()):
        if attr not in have:
            continue  # not a labelled metric of Metrics (e.g. a local variable named `labels`)
        for pos, value in sorted(uses):
            if not any(key[pos] == value for key in have[attr]):
                missing.append(f"{attr}: label {pos} = {value!r}")
    assert not missing, f"label values written by the code but not declared in metrics.py: {missing}"


def test_rejection_reasons_are_declared() -> None:
    used = rejection_reasons(sorted((PKG / "http").rglob("*.py")))
    assert {"too_large", "queue_full", "invalid_json", "bad_encoding", "bad_http", "header_too_large"} <= used
    assert used <= set(metrics_mod.REJECT_REASONS), sorted(used - set(metrics_mod.REJECT_REASONS))
    m = Metrics()  # before any sink is declared: the HTTP front's series exist from the start
    assert {key[0] for key in children(m)["rejected"]} == set(metrics_mod.REJECT_REASONS)


def drop_reasons(paths: list[Path]) -> set[str]:
    """Reasons the DLQ drops files for: `drop(entry, "x")`, `_count_drop(name, events, "x")`."""
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and node.args and _call_name(node) in ("drop", "_count_drop"):
                found |= _strings(node.args[-1])
    return found


def test_dlq_reasons_are_declared() -> None:
    used = dlq_write_reasons(PKG / "pipeline" / "engine.py")
    assert {"failed", "shutdown"} <= used
    assert used <= set(metrics_mod.DLQ_WRITE_REASONS), sorted(used - set(metrics_mod.DLQ_WRITE_REASONS))
    assert set(metrics_mod.DLQ_DROP_REASONS) == V1_DROP_REASONS
    dropped = drop_reasons(sorted((PKG / "dlq").glob("*.py")))
    assert {"ttl", "capacity"} <= dropped
    assert dropped <= V1_DROP_REASONS, sorted(dropped - V1_DROP_REASONS)


@pytest.mark.parametrize("sink", SINKS)
def test_each_sinks_verdicts_are_declared(sink: str) -> None:
    verdicts = set().union(*(result_verdicts(f) for f in sink_files(sink)))
    assert verdicts, f"no Result(...) found in {sink_files(sink)}"
    engine = set().union(*(result_verdicts(f) for f in ENGINE_FILES))
    assert ("retry", "timeout") in engine
    declared_pairs = set(metrics_mod.ENGINE_ATTEMPTS) | set(metrics_mod.SINK_ATTEMPTS[sink])
    missing = sorted(str(v) for v in verdicts | engine
                     if (v not in declared_pairs if v[0] is not None else v[1] not in {r for _, r in declared_pairs}))
    assert not missing, f"{sink}: verdicts not declared in metrics.SINK_ATTEMPTS: {missing}"
    have = {key[1:] for key in children(declared())["upload_attempts"] if key[0] == sink}
    assert have == declared_pairs


def test_opensearch_item_outcomes_are_declared() -> None:
    used = {a.value for path in sink_files("opensearch") for node in ast.walk(_tree(path))
            if isinstance(node, ast.Call) and _call_name(node) == "_count" and node.args
            for a in node.args[:1] if isinstance(a, ast.Constant)}
    assert used == set(metrics_mod.OPENSEARCH_ITEM_OUTCOMES)


def spool_error_reasons(path: Path) -> set[str]:
    """Reasons a failed group commit is counted under: what reason_of() maps an OSError to, and
    each `failure = SpoolError("x")`."""
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.FunctionDef) and node.name == "reason_of":
            found |= _strings(node)
        elif (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "failure" for t in node.targets)
              and isinstance(node.value, ast.Call) and _call_name(node.value) == "SpoolError" and node.value.args):
            found |= _strings(node.value.args[0])
    return found


def test_spool_labels_are_declared() -> None:
    writer = PKG / "spool" / "writer.py"
    used = spool_error_reasons(writer)
    assert {"no_space", "io_error", "lease_lost"} <= used
    assert used <= set(metrics_mod.SPOOL_WRITE_ERROR_REASONS), sorted(used - set(metrics_mod.SPOOL_WRITE_ERROR_REASONS))
    hows: set[str] = set()
    for node in ast.walk(_tree(writer)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "how" for t in node.targets):
            value = node.value  # `"a" if <test> else "b"`: the test's own strings are not values
            hows |= _strings(value.body) | _strings(value.orelse) if isinstance(value, ast.IfExp) else _strings(value)
    assert hows == set(metrics_mod.SPOOL_RECOVERY_HOWS)
    have = children(Metrics())
    assert {k[0] for k in have["spool_write_errors"]} == set(metrics_mod.SPOOL_WRITE_ERROR_REASONS)
    assert {k[0] for k in have["spool_recovered"]} == set(metrics_mod.SPOOL_RECOVERY_HOWS)


def test_the_scans_read_what_they_claim(tmp_path: Path) -> None:
    src = ('def f(x):\n    Refusal(400, "a_b", "m")\n    policy.Refusal(503, "q" if x else "d", "m")\n'
           '    reason = "r"\n    return None, "v"\n    return None\n'
           '    Result(Outcome.RETRY, "t")\n    ok = "p" if x else ""\n    Result(Outcome.OK, ok)\n'
           '    Result(failed, reason or "i")\n    m.dlq.labels(s, "w")\n    self._spill(l, p, "s")\n'
           '    Result(Outcome.RETRY, "e" if x else f"errno_{x}")\n'
           'TABLE = {None: "t1", 1: "t2"}\n'
           'def g(x):\n    self._spill(l, p, TABLE[x])\n')
    path = tmp_path / "scan_probe.py"
    path.write_text(src)
    assert rejection_reasons([path]) == {"a_b", "q", "d", "r", "v"}
    assert result_verdicts(path) == {("retry", "t"), ("ok", "p"), ("ok", "ok"), (None, "i"), ("retry", "e")}
    assert literal_label_values([path]) == {"dlq": {(1, "w")}}
    assert dlq_write_reasons(path) == {"s", "t1", "t2"}


def test_docs_list_every_declared_reason() -> None:
    rows = {}
    for line in (ROOT / "docs" / "ops.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([a-z_]+)`", line)
        if m:
            rows[m.group(1)] = line
    upload_reasons = {r for pairs in metrics_mod.SINK_ATTEMPTS.values() for _, r in pairs}
    upload_reasons |= {r for _, r in metrics_mod.ENGINE_ATTEMPTS}
    for metric, values in (("http_requests_rejected_total", metrics_mod.REJECT_REASONS),
                           ("dlq_events_dropped_total", metrics_mod.DLQ_DROP_REASONS),
                           ("dlq_batches_written_total", metrics_mod.DLQ_WRITE_REASONS),
                           ("opensearch_items_total", metrics_mod.OPENSEARCH_ITEM_OUTCOMES),
                           ("spool_write_errors_total", metrics_mod.SPOOL_WRITE_ERROR_REASONS),
                           ("spool_events_recovered_total", metrics_mod.SPOOL_RECOVERY_HOWS),
                           ("upload_attempts_total", upload_reasons)):
        missing = sorted(v for v in values if f"`{v}`" not in rows[metric])
        assert not missing, f"docs/ops.md, {metric}: reasons not listed: {missing}"


# ------------------------------------------------------------------------------------ fresh registries


def test_fresh_registries_have_process_metrics_and_no_created_series() -> None:
    for m in (Metrics(), Metrics(CollectorRegistry()), declared()):
        text = m.render().decode()
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        assert not [n for n in names if n.endswith("_created")], "a _created series is exported"
        assert "_created" not in text
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                "python_info"} <= names


def test_declare_sinks_is_idempotent_and_keeps_values() -> None:
    m = declared()
    m.dlq_dropped.labels("s3", "ttl").inc(3)
    m.declare_sinks(["s3"])
    assert m.registry.get_sample_value("dlq_events_dropped_total", {"sink": "s3", "reason": "ttl"}) == 3
    assert m.registry.get_sample_value("dlq_events_dropped_total", {"sink": "s3", "reason": "capacity"}) == 0
    assert m.registry.get_sample_value("dlq_events_dropped_total", {"sink": "nope", "reason": "ttl"}) is None
