"""Replaying an opensearch DLQ directory (server replayer and CLI) against the local _bulk stand-in:
DLQ payloads come with lines=None; items rejected for good (mapping errors) go to rejected/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from estat_ingest.cli import main
from estat_ingest.formats.codec import compress
from estat_ingest.metrics import Metrics
from estat_ingest.pipeline.engine import Pipeline
from estat_ingest.sinks import build_sink
from tests.dlq.util import counter_value, data_files, run_async, settings, wait_for, write_entry
from tests.fake_opensearch import FakeOpenSearch
from tests.helpers import decode_object


@pytest.fixture
def fake() -> Iterator[FakeOpenSearch]:
    f = FakeOpenSearch().start()
    yield f
    f.stop()


def record(ts: int, rid: str, body: dict[str, Any]) -> bytes:
    return orjson.dumps({"ts": ts, "ip": "10.0.0.1", "user_agent": "t", "cookie": "",
                         "body": orjson.dumps(body).decode(), "id": rid}) + b"\n"


def make_dir(d: Path) -> tuple[list[str], str]:
    good: list[str] = []
    for c in (1, 3):
        good += write_entry(d, 1_790_000_000 + c, c, 3, compression="zstd")[1]
    ts = 1_790_000_002
    lines = [record(ts, f"mixed-{i}", {"i": i}) for i in range(2)] + [record(ts, "bad-0", {"reject": True})]
    write_entry(d, ts, 2, 3, data=compress(b"".join(lines), "gzip", 1))
    return [*good, "mixed-0", "mixed-1"], "bad-0"


@run_async
async def test_server_replayer_to_opensearch_moves_rejected_items_aside(tmp_path: Path, fake: FakeOpenSearch) -> None:
    d = tmp_path / "dlq" / "opensearch"
    good, bad = make_dir(d)
    s = settings(tmp_path, sinks=("opensearch",), opensearch_urls=(fake.url,), dlq_max_age_s=0)
    metrics = Metrics()
    p = Pipeline(s, metrics, [build_sink("opensearch", s, metrics)])
    await p.start()
    try:
        await wait_for(lambda: len(p.lanes[0].store.index) == 0, 30, "the opensearch DLQ to empty")
    finally:
        await p.drain(5)
    assert sorted(fake.all_docs()) == sorted(good)
    assert all(v == 1 for v in fake.indexed.values())
    assert data_files(d) == []
    rejected = data_files(d / "rejected")
    assert len(rejected) == 1
    recs = decode_object(rejected[0], (d / "rejected" / rejected[0]).read_bytes())
    assert [r["id"] for r in recs] == [bad]
    meta = orjson.loads((d / "rejected" / (rejected[0] + ".meta.json")).read_bytes())
    assert meta["num_events"] == 1 and meta["item_errors"][0]["status"] == 400
    assert counter_value(metrics, "dlq_events_reuploaded_total", sink="opensearch") == len(good)
    assert counter_value(metrics, "dlq_events_rejected_total", sink="opensearch") == 1


def test_cli_replay_to_opensearch(tmp_path: Path, fake: FakeOpenSearch, capsys: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "dlq"
    good, bad = make_dir(root / "opensearch")
    monkeypatch.setenv("SINKS", "opensearch")
    monkeypatch.setenv("OPENSEARCH_URL", fake.url)
    code = main(["dlq", "replay", str(root), "--json", "--no-progress"])
    doc = orjson.loads(capsys.readouterr().out)
    assert code == 1  # not everything was delivered: one item was rejected for good
    assert doc["delivered_events"] == len(good) and len(doc["rejected"]) == 1
    assert sorted(fake.all_docs()) == sorted(good)
    assert data_files(root / "opensearch") == []
    assert len(data_files(root / "opensearch" / "rejected")) == 1
    code = main(["dlq", "replay", str(root), "--json", "--no-progress"])  # again: nothing left, exit 0
    assert code == 0 and orjson.loads(capsys.readouterr().out)["files"] == 0
    assert all(v == 1 for v in fake.indexed.values())
    del bad
