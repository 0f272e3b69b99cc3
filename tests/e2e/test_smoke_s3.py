"""End to end against moto over HTTP: a real subprocess, POST/GET/NDJSON, SIGTERM, every event once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tests.helpers import ServerProcess, http, records_of, s3_objects


def test_events_reach_s3_once_each_in_v1_layout(tmp_path: Path, moto: Any, bucket: str, s3: Any) -> None:
    srv = ServerProcess({
        "RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint, "AWS_REGION": "us-east-1",
        "DLQ_DIR": str(tmp_path / "dlq"), "BATCH_SIZE": "100",
    }, tmp_path).start()
    try:
        sent = []
        for i in range(150):
            body = orjson.dumps({"n": i, "kind": "post"})
            assert srv.post(body)[0] == 200
            sent.append(body.decode())
        for i in range(50):
            status = http("GET", f"{srv.url}/collect?n={i}&kind=get")[0]
            assert status == 200
            sent.append(f"n={i}&kind=get")
        nd = b"\n".join(orjson.dumps({"n": i, "kind": "nd"}) for i in range(100)) + b"\n"
        assert srv.post(nd, {"Content-Type": "application/x-ndjson"})[0] == 200
        sent.extend(orjson.dumps({"n": i, "kind": "nd"}).decode() for i in range(100))
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    objects = s3_objects(s3, bucket)
    got = [(k, r) for k, r in records_of(objects)]
    assert sorted(r["body"] for _, r in got) == sorted(sent)
    for key, rec in got:
        assert list(rec) == ["ts", "ip", "user_agent", "cookie", "body", "id"]
        parts = key.split("/")
        assert parts[0] == "raw" and parts[1].startswith("dt=") and parts[2].startswith("hr=")
        assert parts[3].endswith(".jsonl.gz") and "_test-" in parts[3]
    assert len({r["id"] for _, r in got}) == 300
