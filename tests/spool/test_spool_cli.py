"""`estat-ingest dlq stats|verify|cat` understand spool files: acknowledged records are counted and
shown, a torn tail is reported as never acknowledged, not as corruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from estat_ingest.cli import main
from estat_ingest.formats.codec import compress
from estat_ingest.formats.keys import spool_name
from tests.dlq.util import write_entry


def rec(i: int) -> bytes:
    return orjson.dumps({"ts": 1_790_000_000, "body": f'{{"i":{i}}}', "id": f"s{i:06d}"}) + b"\n"


def make(tmp: Path) -> tuple[Path, Path, int]:
    root = tmp / "dlq"
    write_entry(root / "s3", 1_790_000_100, 1, 3)
    d = root / "spool" / "host-ab12cd" / "s3"
    d.mkdir(parents=True)
    torn = compress(rec(99), "gzip", 1)[:-5]
    f = d / spool_name("dt=2026-09-22/hr=02", "1790000000_host-ab12cd_000001.jsonl.gz")
    f.write_bytes(compress(b"".join(map(rec, range(4))), "gzip", 1) + compress(rec(4), "gzip", 1) + torn)
    return root, f, len(torn)


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_counts_spool_records_apart(tmp_path: Path, capsys: Any) -> None:
    root, _, torn = make(tmp_path)
    code, out, _ = run(capsys, "dlq", "stats", str(root), "--json")
    assert code == 0
    doc = orjson.loads(out)
    by = {g["path"]: g for g in doc["groups"]}
    sp = by["spool/host-ab12cd/s3"]
    assert sp["spool"] and sp["files"] == 1 and sp["events"] == 5 and sp["torn_bytes"] == torn
    assert by["s3"]["events"] == 3 and not by["s3"]["spool"]
    assert doc["total"]["events"] == 8
    code, out, _ = run(capsys, "dlq", "stats", str(root))
    assert code == 0 and "s3 (spool)" in out


def test_verify_reports_a_torn_tail_but_not_as_corrupt(tmp_path: Path, capsys: Any) -> None:
    root, f, torn = make(tmp_path)
    code, out, _ = run(capsys, "dlq", "verify", str(root), "--json")
    doc = orjson.loads(out)
    assert code == 0 and doc["corrupt"] == [] and doc["events"] == 8
    assert doc["spool_torn"] == [{"path": str(f.relative_to(root)), "sink": "s3", "bytes": torn}]


def test_cat_prints_the_acknowledged_records_of_a_spool_file(tmp_path: Path, capsys: Any) -> None:
    _, f, torn = make(tmp_path)
    code, out, err = run(capsys, "dlq", "cat", str(f))
    assert code == 0
    assert [orjson.loads(x)["id"] for x in out.splitlines()] == [f"s{i:06d}" for i in range(5)]
    assert f"{torn} bytes of torn tail" in err
