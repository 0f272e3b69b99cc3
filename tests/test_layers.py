"""The package's parts import each other in one direction only (pyproject.toml [tool.importlinter]).

import-linter builds the import graph from the source (imports inside functions included, those
under `if TYPE_CHECKING:` excluded) and checks two contracts: the layers along the data path
(cli → workers → app → http → pipeline → spool → dlq → delivery → sinks → formats → log, preflight
→ config, metrics, fsutil, runtime), and no cycle between the parts of any package. A new part
must be given a layer.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    p = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 kept, 0 broken" in p.stdout


def test_every_part_of_the_package_has_a_layer() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [layers] = [c["layers"] for c in conf["contracts"] if c["type"] == "layers"]
    listed = {name.strip().removeprefix("estat_ingest.") for layer in layers for name in layer.split("|")}
    pkg = ROOT / "estat_ingest"
    parts = {p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__")}
    parts |= {p.name for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts - listed == set(), "give these parts a layer in pyproject.toml [tool.importlinter]"
