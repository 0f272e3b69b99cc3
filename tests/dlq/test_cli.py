"""`estat-ingest dlq stats|verify|replay|cat`: output, --json and exit codes, on real directories."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from estat_ingest.cli import main
from tests.dlq.util import data_files, write_entry
from tests.helpers import REPO, decode_object, file_objects, records_of, s3_objects


def make_root(tmp: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp / "dlq"
    ids: dict[str, list[str]] = {"s3": [], "file": [], "v1": []}
    for c in range(1, 4):
        ids["s3"] += write_entry(root / "s3", 1_700_000_000 + c * 10, c, 5)[1]
    for c in range(4, 6):
        ids["file"] += write_entry(root / "file", 1_700_000_100 + c, c, 3, compression="zstd")[1]
    ids["v1"] += write_entry(root, 1_699_999_000, 9, 4, v1=True, instance="ip-10-0-0-1")[1]
    return root, ids


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_json_and_table(tmp_path: Path, capsys: Any) -> None:
    root, _ = make_root(tmp_path)
    (root / "s3" / "README.txt").write_text("not ours")
    code, out, _ = run(capsys, "dlq", "stats", str(root), "--json")
    assert code == 0
    doc = orjson.loads(out)
    by = {g["path"]: g for g in doc["groups"]}
    assert by["s3"]["files"] == 3 and by["s3"]["events"] == 15 and by["s3"]["foreign"] == 1
    assert by["file"]["files"] == 2 and by["file"]["events"] == 6
    assert by["."]["sink"] == "s3" and by["."]["files"] == 1 and by["."]["events"] == 4
    assert doc["total"]["files"] == 6 and doc["total"]["events"] == 25
    assert by["s3"]["oldest_age_s"] > by["s3"]["newest_age_s"] > 0
    code, out, _ = run(capsys, "dlq", "stats", str(root))
    assert code == 0 and "files" in out.splitlines()[1] and ". (v1)" in out
    code, _, err = run(capsys, "dlq", "stats", str(tmp_path / "missing"))
    assert code == 2 and "not a directory" in err


def test_verify_lists_corrupt_files_and_exits_1(tmp_path: Path, capsys: Any) -> None:
    root, _ = make_root(tmp_path)
    code, out, _ = run(capsys, "dlq", "verify", str(root), "--json")
    assert code == 0 and orjson.loads(out)["ok_files"] == 6 and orjson.loads(out)["events"] == 25
    name, _ = write_entry(root / "s3", 1_700_000_500, 7, 5)
    data = (root / "s3" / name).read_bytes()
    (root / "s3" / name).write_bytes(data[:-4])  # no ISIZE: torn
    bad_json = gzip.compress(b'{"ok":1}\n{"torn": \n')
    name2, _ = write_entry(root / "file", 1_700_000_600, 8, 2, data=bad_json)
    code, out, _ = run(capsys, "dlq", "verify", str(root), "--json")
    doc = orjson.loads(out)
    assert code == 1
    assert sorted(c["path"] for c in doc["corrupt"]) == sorted([f"file/{name2}", f"s3/{name}"])
    code, out, _ = run(capsys, "dlq", "verify", str(root / "s3"))
    assert code == 1 and f"CORRUPT  {name}" in out


def test_cat_prints_the_records(tmp_path: Path, capsys: Any) -> None:
    root, _ = make_root(tmp_path)
    name = data_files(root / "file")[0]
    code, out, _ = run(capsys, "dlq", "cat", str(root / "file" / name))
    assert code == 0
    recs = [orjson.loads(x) for x in out.splitlines()]
    assert [r["id"] for r in recs] == [f"{name.split('.')[0]}-{i:06d}" for i in range(3)]
    (root / "file" / name).write_bytes(b"garbage")
    assert run(capsys, "dlq", "cat", str(root / "file" / name))[0] == 1


def test_replay_to_file_sink_dry_run_then_for_real_then_again(tmp_path: Path, capsys: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root, ids = make_root(tmp_path)
    out_dir = tmp_path / "out"
    monkeypatch.setenv("FILE_SINK_DIR", str(out_dir))
    monkeypatch.setenv("SINKS", "file")
    code, out, _ = run(capsys, "dlq", "replay", str(root / "file"), "--dry-run")
    assert code == 0 and out.count("would send") == 3 and not out_dir.exists()
    assert len(data_files(root / "file")) == 2
    code, out, err = run(capsys, "dlq", "replay", str(root / "file"), "--json")
    doc = orjson.loads(out)
    assert code == 0 and doc["delivered_files"] == 2 and doc["delivered_events"] == 6, err
    got = [r["id"] for _, r in records_of(file_objects(out_dir))]
    assert sorted(got) == sorted(ids["file"])
    assert data_files(root / "file") == []
    code, out, _ = run(capsys, "dlq", "replay", str(root / "file"), "--json")  # safe to run twice
    assert code == 0 and orjson.loads(out)["files"] == 0
    assert sorted(r["id"] for _, r in records_of(file_objects(out_dir))) == sorted(ids["file"])


def test_replay_whole_root_to_s3_including_v1_files(tmp_path: Path, capsys: Any, moto: Any, bucket: str, s3: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root, ids = make_root(tmp_path)
    for k, v in {"RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint, "AWS_REGION": "us-east-1",
                 "SINKS": "s3", "PARTITION_TZ": "Asia/Seoul"}.items():
        monkeypatch.setenv(k, v)
    code, out, err = run(capsys, "dlq", "replay", str(root), "--sink", "s3", "--concurrency", "3", "--json")
    doc = orjson.loads(out)
    assert code == 0, (out, err)
    assert doc["delivered_files"] == 6 and doc["delivered_events"] == 25
    objs = s3_objects(s3, bucket)
    assert sorted(r["id"] for _, r in records_of(objs)) == sorted(ids["s3"] + ids["file"] + ids["v1"])
    v1_key = [k for k in objs if "ip-10-0-0-1" in k]
    # v1 file: its own name, in the partition of the unix time in the name (1699999000 = 2023-11-15 06:56 KST)
    assert v1_key == ["raw/dt=2023-11-15/hr=06/1699999000_ip-10-0-0-1_000009.jsonl.gz"]
    assert data_files(root / "s3") == [] and data_files(root) == []


def test_replay_exit_1_when_not_everything_is_delivered_subprocess(tmp_path: Path) -> None:
    root = tmp_path / "dlq"
    write_entry(root / "file", 1_700_000_000, 1, 2)
    name, _ = write_entry(root / "file", 1_700_000_001, 2, 2)
    (root / "file" / name).write_bytes(b"\x1f\x8b torn")
    env = {"PATH": "/usr/bin:/bin", "SINKS": "file", "FILE_SINK_DIR": str(tmp_path / "out"), "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "estat_ingest", "dlq", "replay", str(root), "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert b"CORRUPT" in p.stdout and b"delivered 1/2 files" in p.stdout
    assert data_files(root / "file") == [name]  # never deleted without delivery
    objs = file_objects(tmp_path / "out")
    assert len(objs) == 1 and len(decode_object(next(iter(objs)), next(iter(objs.values())))) == 2


def test_usage_and_configuration_errors_exit_2(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = make_root(tmp_path)
    monkeypatch.delenv("RAW_BUCKET", raising=False)
    monkeypatch.setenv("SINKS", "file")
    code, _, err = run(capsys, "dlq", "replay", str(root), "--sink", "s3")
    assert code == 2 and "RAW_BUCKET" in err
    assert len(data_files(root / "s3")) == 3  # nothing touched
    code, _, err = run(capsys, "dlq", "replay", str(root), "--sink", "nosuch")
    assert code == 2 and "--sink" in err
    code, _, err = run(capsys, "dlq", "replay", str(root), "--concurrency", "0")
    assert code == 2
    code, _, err = run(capsys, "dlq", "cat", str(root / "s3" / "missing.jsonl.gz"))
    assert code == 2
    monkeypatch.setenv("S3_TIMEOUT", "forever")
    code, _, err = run(capsys, "dlq", "replay", str(root / "file"))
    assert code == 2 and "S3_TIMEOUT" in err


def test_replay_respects_live_claims_and_steals_them_when_told(tmp_path: Path, capsys: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    root = tmp_path / "dlq"
    d = root / "file"
    live, live_ids = write_entry(d, 1_700_000_000, 1, 2)
    stale, stale_ids = write_entry(d, 1_700_000_001, 2, 3)
    now = int(time.time())
    (d / live).rename(d / f"{live}.claim-{now}-otherhost-42")  # a live replayer is sending it
    (d / stale).rename(d / f"{stale}.claim-{now - 3600}-deadhost-7")  # left by a dead one
    monkeypatch.setenv("SINKS", "file")
    monkeypatch.setenv("FILE_SINK_DIR", str(tmp_path / "out"))
    code, out, _ = run(capsys, "dlq", "replay", str(root), "--no-progress")
    assert code == 1 and "SKIPPED   1 files claimed" in out
    assert sorted(r["id"] for _, r in records_of(file_objects(tmp_path / "out"))) == sorted(stale_ids)
    code, out, _ = run(capsys, "dlq", "replay", str(root), "--no-progress", "--steal-claims", "--json")
    assert code == 0 and orjson.loads(out)["delivered_files"] == 1
    assert sorted(r["id"] for _, r in records_of(file_objects(tmp_path / "out"))) == sorted(stale_ids + live_ids)
    assert list(d.iterdir()) == []


def test_replay_stops_on_a_missing_bucket_moves_nothing_and_exits_1(tmp_path: Path, capsys: Any, moto: Any, s3: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root, ids = make_root(tmp_path)
    missing = f"later-{tmp_path.name[-20:].lower().replace('_', '-')}"
    for k, v in {"RAW_BUCKET": missing, "S3_ENDPOINT_URL": moto.endpoint, "AWS_REGION": "us-east-1",
                 "SINKS": "s3", "S3_APP_RETRIES": "0"}.items():
        monkeypatch.setenv(k, v)
    before = {g: data_files(root / g) for g in ("s3", "file")}
    code, out, _ = run(capsys, "dlq", "replay", str(root), "--sink", "s3", "--concurrency", "1", "--json")
    doc = orjson.loads(out)
    assert code == 1 and doc["outage"] == "s3: no_bucket" and doc["rejected"] == [] and doc["delivered_files"] == 0
    assert doc["not_attempted"] == 5  # one file told us; the other five were left alone
    assert {g: data_files(root / g) for g in ("s3", "file")} == before and data_files(root) != []
    assert not (root / "s3" / "rejected").exists() and not list(root.rglob("*.claim-*"))
    code, out, _ = run(capsys, "dlq", "replay", str(root), "--sink", "s3")
    assert code == 1 and "OUTAGE    s3: no_bucket" in out
    s3.create_bucket(Bucket=missing)
    code, out, err = run(capsys, "dlq", "replay", str(root), "--sink", "s3", "--json")
    assert code == 0, (out, err)
    got = sorted(r["id"] for _, r in records_of(s3_objects(s3, missing)))
    assert got == sorted(ids["s3"] + ids["file"] + ids["v1"])
