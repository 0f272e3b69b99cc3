"""The docs are checked against the code, so they cannot drift the way v1's did.

1. docs/config.md documents exactly the variables estat_ingest/config.py reads (read from the
   source: every `get("NAME", ...)` call), no more, no less.
2. docs/ops.md documents every metric registered in estat_ingest.metrics.Metrics (with its type
   and labels), and no metric that does not exist.
3. Every relative link in README.md and docs/*.md points to a file that exists (and, for links
   into a Markdown file with `#anchor`, to a heading or `<a id>` that exists); every runbook link
   in deploy/prometheus/alerts.yml lands on an anchor of docs/ops.md.
4. Every `estat-ingest <subcommand> [--flag]` in code spans and code blocks of the docs exists in
   the CLI parser (estat_ingest.cli.build_parser()).

The parsers are tested on small texts too, so a broken parser cannot make a check pass vacuously.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG_PY = ROOT / "estat_ingest" / "config.py"
CONFIG_MD = DOCS / "config.md"
OPS_MD = DOCS / "ops.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

VAR_RE = re.compile(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z]{3,})`")
METRIC_RE = re.compile(r"`([a-z][a-z0-9_]*)`")


# ------------------------------------------------------------------------------------ parsers


ENV_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]*")


def variables_read(source: str) -> set[str]:
    """Environment names read in config.py's source: the string literal first argument of
    `Var("NAME", ...)` (the table Settings.from_env reads), of `get("NAME", ...)`, and of any other
    `x.get("NAME")`, `getenv("NAME")` or `environ["NAME"]` with an ALL_CAPS name, so a variable
    read around the table is not missed."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        arg: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if fname in ("get", "getenv", "Var"):
                arg = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, (ast.Name, ast.Attribute)):
            base = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            if base == "environ":
                arg = node.slice
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("get", "Var"):
                names.add(arg.value)  # the table or the helper: every literal is a variable
            elif ENV_NAME_RE.fullmatch(arg.value):
                names.add(arg.value)
    return names


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of every Markdown table body row (header and separator rows excluded), outside code."""
    rows: list[list[str]] = []
    lines = strip_fences(markdown).splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if not s.startswith("|"):
            continue
        if re.fullmatch(r"\|[\s:|-]+\|?", s):  # separator row
            continue
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if re.fullmatch(r"\|[\s:|-]+\|?", nxt):  # header row (followed by the separator)
            continue
        rows.append([c.strip() for c in s.strip("|").split("|")])
    return rows


def documented_variables(markdown: str) -> set[str]:
    """ALL_CAPS names in backticks in the FIRST column of the tables of config.md."""
    out: set[str] = set()
    for cells in table_rows(markdown):
        out |= set(VAR_RE.findall(cells[0]))
    return out


def documented_metrics(markdown: str) -> dict[str, tuple[str, str]]:
    """First-column metric names in the tables of ops.md → (type cell, labels cell)."""
    out: dict[str, tuple[str, str]] = {}
    for cells in table_rows(markdown):
        if len(cells) < 3:
            continue
        typ = cells[1].strip("` ").lower()
        if typ not in ("counter", "gauge", "histogram"):
            continue
        for name in METRIC_RE.findall(cells[0]):
            out[name] = (typ, cells[2])
    return out


def strip_fences(markdown: str) -> str:
    """The text with fenced code blocks blanked (line count kept)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def code_lines(markdown: str) -> list[str]:
    """Lines of fenced code blocks plus the content of every inline code span."""
    out: list[str] = []
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            out.append(line)
        else:
            out.extend(re.findall(r"`([^`]+)`", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in strip_fences(markdown).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return found


LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def links(markdown: str) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", strip_fences(markdown))  # links in code are not links
    return [a or b for a, b in LINK_RE.findall(text)]


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))


CLI_RE = re.compile(r"(?<![\w/.:-])estat-ingest((?:[ \t]+[^\s]+)*)")
SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "<", "2>&1", "#", "&", "\\"}


def cli_mentions(markdown: str) -> list[list[str]]:
    """Token lists after `estat-ingest` (and `python -m estat_ingest`) in code, up to a shell operator."""
    out: list[list[str]] = []
    for line in code_lines(markdown):
        for prog in ("estat-ingest", "-m estat_ingest"):
            for m in re.finditer(r"(?<![\w/.:-])" + re.escape(prog) + r"(?=[ \t]|$)", line):
                tokens: list[str] = []
                for tok in line[m.end():].split():
                    if tok in SHELL_STOP or tok.startswith(("#", ">", "2>")) or tok.startswith(("\"", "'")):
                        break
                    tokens.append(tok.rstrip(",;)`"))
                if tokens:
                    out.append(tokens)
    return out


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def check_cli(tokens: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Problems with one mention: unknown subcommand (any alternative of `a|b`) or option."""
    problems: list[str] = []
    current = parser
    for tok in tokens:
        subs = subparsers(current)
        if tok.startswith("-"):
            flag = tok.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][\w-]*", flag) and flag not in options(current):
                problems.append(f"option {flag!r} not accepted by `{current.prog}`")
            continue
        if not subs:
            break  # positional arguments (DIR, ...) from here on
        if not re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", tok):
            break  # a placeholder such as <command>; nothing to check
        alternatives = tok.split("|")
        missing = [a for a in alternatives if a not in subs]
        if missing:
            problems.append(f"`{current.prog} {tok}`: no subcommand {', '.join(missing)}")
            break
        current = subs[alternatives[0]]
        if len(alternatives) > 1:
            break  # flags after `a|b` may belong to any of them
    return problems


# ------------------------------------------------------------------------------------ helpers


def read(path: Path) -> str:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return path.read_text(encoding="utf-8")


def doc_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    readme = ROOT / "README.md"
    return ([readme] if readme.is_file() else []) + files


def registered_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Exposed name → (type, label names) for every metric of a fresh Metrics()."""
    from prometheus_client.metrics import MetricWrapperBase

    from estat_ingest.metrics import Metrics

    m = Metrics()
    labels: dict[str, frozenset[str]] = {}
    for obj in vars(m).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                labels[family.name] = frozenset(obj._labelnames)
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for family in m.registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        # collectors (process_*, python_info) are not metric objects: their samples carry the labels
        from_samples = frozenset(k for s in family.samples for k in s.labels) - {"le"}
        out[name] = (family.type, labels.get(family.name, from_samples))
    return out


# ------------------------------------------------------------------------------------ 1. config


def test_config_md_documents_exactly_the_variables_config_py_reads() -> None:
    read_vars = variables_read(read(CONFIG_PY))
    assert len(read_vars) >= 40, f"parser found only {sorted(read_vars)}: did config.py change shape?"
    documented = documented_variables(read(CONFIG_MD))
    missing = sorted(read_vars - documented)
    stale = sorted(documented - read_vars)
    assert not missing, f"read by config.py but not in a docs/config.md table: {missing}"
    assert not stale, f"in a docs/config.md table but not read by config.py: {stale}"


DEFAULT_RE = re.compile(r"^`([^`]*)`(?:\s*\(.*\))?$")


def documented_defaults(markdown: str) -> dict[str, str]:
    """Variable → default, for rows whose default cell is one code span (plus a remark)."""
    out: dict[str, str] = {}
    for cells in table_rows(markdown):
        names = VAR_RE.findall(cells[0])
        if len(names) == 1 and len(cells) > 1:
            m = DEFAULT_RE.match(cells[1])
            if m:
                out[names[0]] = m.group(1)
    return out


def default_problems(defaults: dict[str, str]) -> list[str]:
    from estat_ingest.config import ConfigError, Settings

    base = Settings.from_env({})
    wrong = []
    for name, value in sorted(defaults.items()):
        try:
            got = Settings.from_env({name: value})
        except ConfigError as err:
            wrong.append(f"{name}={value!r}: {err}")
            continue
        if got != base:
            diff = {k: v for k, v in got.describe().items() if base.describe()[k] != v}
            wrong.append(f"{name}: documented default {value!r} differs from the code: {diff}")
    return wrong


def test_config_md_defaults_are_the_code_defaults() -> None:
    """Setting a variable to its documented default must change nothing in Settings."""
    defaults = documented_defaults(read(CONFIG_MD))
    assert len(defaults) >= 40, f"only {len(defaults)} defaults found in docs/config.md"
    problems = default_problems(defaults)
    assert not problems, "\n".join(problems)


def test_config_md_defaults_of_v1_names_are_marked() -> None:
    """Rows whose variable v1 also had say so (DESIGN.md §3: v1's names work unchanged)."""
    v1 = {"AWS_REGION", "RAW_BUCKET", "RAW_PREFIX", "DLQ_PREFIX", "HTTP_ADDR", "MAX_BODY_SIZE",
          "CHANNEL_SIZE", "UPLOAD_QUEUE", "BATCH_SIZE", "FLUSH_INTERVAL", "S3_TIMEOUT", "S3_APP_RETRIES",
          "DLQ_DIR", "DLQ_MAX_AGE", "DLQ_MAX_SIZE_BYTES", "LOG_LEVEL"}
    unmarked = []
    for cells in table_rows(read(CONFIG_MD)):
        for name in VAR_RE.findall(cells[0]):
            if name in v1 and "v1" not in cells[0]:
                unmarked.append(name)
    assert not unmarked, f"v1 variables not marked (v1) in docs/config.md: {unmarked}"


def test_config_parsers_catch_missing_and_stale() -> None:
    src = ('V = (Var("EPSILON_X", "eps", int), Var(name, "x", int))\n'
           'def f():\n    get("ALPHA_ONE", int)\n    values.get("raw_bucket")\n    get(name)\n'
           '    os.environ.get("BETA")\n    os.getenv("GAMMA_2")\n    os.environ["DELTA"]\n')
    assert variables_read(src) == {"EPSILON_X", "ALPHA_ONE", "BETA", "GAMMA_2", "DELTA"}
    md = ("| variable | default |\n|---|---|\n| `ALPHA_ONE` (v1) | `1` |\n| `GONE_VAR` | — |\n"
          "\n```\n| `IN_CODE` | x |\n```\nprose `PROSE_VAR`\n")
    assert documented_variables(md) == {"ALPHA_ONE", "GONE_VAR"}
    assert documented_defaults(md) == {"ALPHA_ONE": "1"}
    assert documented_defaults("| v | d |\n|-|-|\n| `X_Y` | `5m` (300 s) |\n| `Z_W` | `a` if `b` |\n") == {"X_Y": "5m"}


# ------------------------------------------------------------------------------------ 2. metrics


def test_ops_md_documents_every_metric_with_type_and_labels() -> None:
    registered = registered_metrics()
    assert "http_requests_total" in registered and len(registered) >= 20
    documented = documented_metrics(read(OPS_MD))
    missing = sorted(set(registered) - set(documented))
    assert not missing, f"metrics in estat_ingest/metrics.py missing from docs/ops.md tables: {missing}"
    stale = sorted(set(documented) - set(registered))
    assert not stale, f"metrics in docs/ops.md tables that the code does not register: {stale}"
    wrong = []
    for name, (typ, labels) in registered.items():
        doc_type, doc_labels = documented[name]
        if doc_type != typ:
            wrong.append(f"{name}: documented {doc_type}, registered {typ}")
        named = set(re.findall(r"`([a-z_]+)`", doc_labels))
        if named != set(labels):
            wrong.append(f"{name}: documented labels {sorted(named)}, registered {sorted(labels)}")
    assert not wrong, "\n".join(wrong)


def test_metric_table_parser() -> None:
    md = ("| metric | type | labels | meaning |\n|---|---|---|---|\n"
          "| `a_total` (v1) | counter | `sink`, `reason` | x |\n| `b` | gauge | — | y |\n"
          "| `ALPHA` | not a type | | |\n")
    assert documented_metrics(md) == {"a_total": ("counter", "`sink`, `reason`"), "b": ("gauge", "—")}


# ------------------------------------------------------------------------------------ module map


def test_architecture_module_map_matches_the_package() -> None:
    """Every module of estat_ingest/ (package __init__ files aside) is in the module map of
    docs/architecture.md, and every module the map names exists."""
    pkg = ROOT / "estat_ingest"
    modules = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if p.name != "__init__.py"}
    assert "pipeline/engine.py" in modules
    mapped: set[str] = set()
    for cells in table_rows(read(DOCS / "architecture.md")):
        mapped |= set(re.findall(r"`([\w/]+\.py)`", cells[0]))
    missing = sorted(modules - mapped)
    stale = sorted(m for m in mapped - modules if not (pkg / m).is_file())
    assert not missing, f"modules missing from the module map of docs/architecture.md: {missing}"
    assert not stale, f"modules in the map of docs/architecture.md that do not exist: {stale}"


# ------------------------------------------------------------------------------------ 3. links


def test_relative_links_point_to_existing_files_and_anchors() -> None:
    files = doc_files()
    assert (ROOT / "README.md") in files and CONFIG_MD in files
    broken = []
    for path in files:
        for target in links(read(path)):
            if is_external(target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such anchor)")
    assert not broken, "\n".join(broken)


def test_alert_runbook_links_land_on_ops_md_anchors() -> None:
    if not ALERTS.is_file():
        pytest.skip("deploy/prometheus/alerts.yml does not exist")
    import yaml

    rules = [r for g in yaml.safe_load(read(ALERTS))["groups"] for r in g["rules"] if "alert" in r]
    assert rules
    have = anchors(read(OPS_MD))
    bad = []
    for rule in rules:
        url = rule.get("annotations", {}).get("runbook_url", "")
        m = re.search(r"docs/ops\.md#([\w-]+)$", url)
        if not m or m.group(1) not in have:
            bad.append(f"{rule['alert']}: {url!r}")
    assert not bad, f"runbook links without an anchor in docs/ops.md: {bad}"


def test_link_and_anchor_parsers() -> None:
    md = ("# Shutdown: order & budgets\n## `DLQ` backlog\n<a id=\"dlq-backlog\"></a>\n"
          "[a](x.md) [b](https://e.org) `[c](code.md)` ![i](img.png) [d](y.md#top \"t\")\n"
          "```\n[e](fenced.md)\n# not a heading\n```\n")
    assert links(md) == ["x.md", "https://e.org", "img.png", "y.md#top"]
    assert anchors(md) == {"shutdown-order--budgets", "dlq-backlog"}


# ------------------------------------------------------------------------------------ 4. CLI


def test_every_cli_command_in_the_docs_exists() -> None:
    from estat_ingest.cli import build_parser

    parser = build_parser()
    problems, seen = [], 0
    for path in doc_files():
        for tokens in cli_mentions(read(path)):
            seen += 1
            problems += [f"{path.relative_to(ROOT)}: {p}" for p in check_cli(tokens, parser)]
    assert seen >= 5, "expected the docs to show estat-ingest commands"
    assert not problems, "\n".join(problems)


def test_cli_checker_rejects_unknown_commands_and_flags() -> None:
    from estat_ingest.cli import build_parser

    parser = build_parser()
    md = ("run `estat-ingest serve --workers 4` or `estat-ingest dlq stats|verify DIR`\n"
          "```sh\nBATCH_SIZE=1 estat-ingest config show | jq .\nestat-ingest servee\n"
          "python -m estat_ingest healthcheck --nope\n```\nestat-ingest is prose, `/ecs/estat-ingest` a path\n")
    mentions = cli_mentions(md)
    assert mentions == [["serve", "--workers", "4"], ["dlq", "stats|verify", "DIR"], ["config", "show"],
                        ["servee"], ["healthcheck", "--nope"]]
    results = [check_cli(t, parser) for t in mentions]
    assert results[:3] == [[], [], []]
    assert results[3] and results[4]
    assert check_cli(["dlq", "stats|bogus", "DIR"], parser)
