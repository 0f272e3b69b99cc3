"""`estat-ingest dlq cat DIR|FILE [--partial]` and the keys `dlq replay --dry-run` shows.

A directory prints every DLQ and spool file in it, oldest first; `--partial` prints the complete
lines of a damaged file's decodable start and says on stderr what was cut; piping into `head`
ends quietly with 141 (as `cat` and `zcat` do); a dry run names the full destination.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from estat_ingest.cli import main
from estat_ingest.formats.codec import compress
from tests.dlq.util import data_files, lines_for, write_entry
from tests.helpers import REPO


def run(capsys: Any, *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def ids_of(lines: list[str]) -> list[str]:
    return [orjson.loads(x)["id"] for x in lines]


def test_cat_a_directory_prints_every_file_oldest_first_spool_files_too(tmp_path: Path, capsys: Any) -> None:
    root = tmp_path / "dlq"
    newest = write_entry(root / "s3", 1_700_000_300, 3, 2)[1]
    middle = write_entry(root / "file", 1_700_000_200, 2, 2, compression="zstd")[1]
    v1 = write_entry(root, 1_700_000_100, 1, 2, v1=True)[1]
    # a claimed file (being replayed right now) is still printed
    claimed_name, claimed = write_entry(root / "s3", 1_700_000_250, 4, 1)
    (root / "s3" / claimed_name).rename(root / "s3" / f"{claimed_name}.claim-1700000999-other-1")
    # an open batch of ACK_MODE=durable (a spool file), the oldest of all
    spool = root / "spool" / "host-1" / "s3"
    spool.mkdir(parents=True)
    spool_name = "1700000050_host-1_000007.jsonl.gz"
    (spool / f"dt=2023-11-15+hr=07+{spool_name}").write_bytes(compress(lines_for("sp", 2, 1_700_000_050), "gzip", 1))
    # moved aside: not in the output
    write_entry(root / "s3" / "rejected", 1_700_000_000, 5, 1)

    code, out, err = run(capsys, "dlq", "cat", str(root))
    assert (code, err) == (0, [])
    assert ids_of(out) == ["sp-000000", "sp-000001", *v1, *middle, *claimed, *newest]
    # one sink's directory, and the rejected/ directory on its own
    assert ids_of(run(capsys, "dlq", "cat", str(root / "s3"))[1]) == [*claimed, *newest]
    assert len(run(capsys, "dlq", "cat", str(root / "s3" / "rejected"))[1]) == 1


def test_cat_a_directory_goes_on_past_a_corrupt_file_and_exits_1(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "dlq" / "s3"
    first = write_entry(d, 1_700_000_001, 1, 2)[1]
    bad, _ = write_entry(d, 1_700_000_002, 2, 2)
    (d / bad).write_bytes(b"garbage")
    last = write_entry(d, 1_700_000_003, 3, 2)[1]
    code, out, err = run(capsys, "dlq", "cat", str(d))
    assert code == 1 and ids_of(out) == first + last
    assert err == [f"estat-ingest dlq cat: {d / bad}: corrupt: Error -3 while decompressing data: incorrect header "
                   "check; --partial prints its valid start, the other files are printed"]


def test_partial_prints_the_complete_lines_of_a_truncated_file(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "dlq" / "s3"
    name, ids = write_entry(d, 1_700_000_001, 1, 3000)
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])  # torn in the middle
    code, out, err = run(capsys, "dlq", "cat", str(d / name))
    assert code == 1 and out == []
    assert err == [f"estat-ingest dlq cat: {d / name}: corrupt: truncated gzip stream; --partial prints its valid "
                   "start"]
    code, out, err = run(capsys, "dlq", "cat", "--partial", str(d / name))
    assert code == 1
    assert 0 < len(out) < 3000 and ids_of(out) == ids[: len(out)]  # a valid prefix, line for line
    [line] = err
    assert line.startswith(f"estat-ingest dlq cat: {d / name}: corrupt (truncated gzip stream): printed the first "
                           f"{len(out)} complete lines; cut ")
    assert line.endswith(" decoded bytes after them")


def test_partial_stops_at_damage_and_at_a_line_that_is_not_json(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "dlq" / "file"
    torn = gzip.compress(b'{"id":"a"}\n{"id":"b"}\n{"torn": \n{"id":"c"}\n')[:-8]  # no CRC32 and length
    name, _ = write_entry(d, 1_700_000_001, 1, 3, data=torn)
    code, out, err = run(capsys, "dlq", "cat", "--partial", str(d / name))
    assert code == 1 and ids_of(out) == ["a", "b"]  # and not what follows the line that is not JSON
    assert err == [f"estat-ingest dlq cat: {d / name}: corrupt (truncated gzip stream): printed the first 2 "
                   "complete lines; cut 21 decoded bytes after them"]
    # zstd too: a second frame that is garbage after a good one
    z = compress(b'{"id":"z"}\n', "zstd", 3)
    name, _ = write_entry(d, 1_700_000_002, 2, 1, compression="zstd", data=z + b"\x28\xb5\x2f\xfd garbage")
    code, out, err = run(capsys, "dlq", "cat", "--partial", str(d / name))
    assert code == 1 and ids_of(out) == ["z"]
    [line] = err
    assert "corrupt (zstd: " in line and "printed the first 1 complete lines" in line
    assert line.endswith(f"of {len(z) + 12} compressed bytes after the damage")


def test_partial_on_a_good_file_is_the_file(tmp_path: Path, capsys: Any) -> None:
    d = tmp_path / "dlq" / "s3"
    name, ids = write_entry(d, 1_700_000_001, 1, 5)
    assert run(capsys, "dlq", "cat", "--partial", str(d / name)) == (0, [orjson.dumps(
        {"ts": 1_700_000_001, "body": f'{{"i":{i}}}', "id": ids[i]}).decode() for i in range(5)], [])


def test_piped_into_head_it_stops_quietly(tmp_path: Path) -> None:
    d = tmp_path / "dlq" / "s3"
    for c in range(1, 6):
        write_entry(d, 1_700_000_000 + c, c, 20_000)
    cat = subprocess.Popen([sys.executable, "-m", "estat_ingest", "dlq", "cat", str(tmp_path / "dlq")], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cat.stdout is not None and cat.stderr is not None
    first = cat.stdout.readline()
    cat.stdout.close()  # what `head -1` does after its line
    err = cat.stderr.read()
    cat.stderr.close()
    assert cat.wait(60) == 141
    assert orjson.loads(first)["id"] == "1700000001_t-abc123_000001-000000"
    assert err == b""  # no BrokenPipeError traceback, no "Exception ignored"


@pytest.mark.parametrize("sink", ["s3", "file", "opensearch"])
def test_dry_run_shows_the_full_destination(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch,
                                            sink: str) -> None:
    root = tmp_path / "dlq"
    name, _ = write_entry(root / sink, 1_764_821_594, 1, 2)  # 2025-12-04 13:13 KST, 04:13 UTC
    env = {"RAW_BUCKET": "estat-raw", "RAW_PREFIX": "events/raw/", "FILE_SINK_DIR": str(tmp_path / "out"),
           "OPENSEARCH_URL": "http://127.0.0.1:9", "OPENSEARCH_INDEX": "events-%Y.%m.%d", "SINKS": sink}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, _ = run(capsys, "dlq", "replay", str(root), "--dry-run")
    assert code == 0
    want = {"s3": f"s3://estat-raw/events/raw/dt=2025-12-04/hr=13/{name}",
            "file": str(tmp_path / "out" / "events" / "raw" / "dt=2025-12-04" / "hr=13" / name),
            "opensearch": "opensearch index events-2025.12.04 (of the batch's first event)"}[sink]
    assert out[0] == f"would send  {sink}/{name}  2 events  → {want}"
    assert data_files(root / sink) == [name]  # nothing sent, nothing deleted
