"""End to end against moto over HTTP: a real subprocess, POST/GET/NDJSON, SIGTERM, every event once,
v1 field order and key layout, for gzip and zstd."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import ServerProcess, http, records_of, s3_objects

FRONTS = ("aiohttp", "fast")  # every test here runs against both HTTP fronts (tests/conftest.py)

KEY_RE = re.compile(r"^raw/dt=\d{4}-\d{2}-\d{2}/hr=\d{2}/\d{10}_test-[0-9a-f]{6}_\d{6}\.jsonl\.(gz|zst)$")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_events_reach_s3_once_each_in_v1_layout(tmp_path: Path, moto: Any, bucket: str, s3: Any,
                                                compression: str) -> None:
    srv = ServerProcess({
        "RAW_BUCKET": bucket, "S3_ENDPOINT_URL": moto.endpoint, "AWS_REGION": "us-east-1",
        "DLQ_DIR": str(tmp_path / "dlq"), "BATCH_SIZE": "400", "COMPRESSION": compression,
        "RAW_PREFIX": "raw/",
    }, tmp_path).start()
    sent: list[str] = []
    try:
        for i in range(700):
            body = orjson.dumps({"n": i, "kind": "post", "text": "héllo <&> \u2028"})
            assert srv.post(body, {"User-Agent": "test-agent", "Cookie": "sid=s1"})[0] == 200
            sent.append(body.decode())
        for i in range(300):
            assert http("GET", f"{srv.url}/collect?n={i}&kind=get&u=%2Fa%3Fb")[0] == 200
            sent.append(f"n={i}&kind=get&u=%2Fa%3Fb")
        for r in range(10):
            lines = [orjson.dumps({"n": r * 100 + i, "kind": "nd"}) for i in range(100)]
            assert srv.post(b"\n".join(lines) + b"\n", {"Content-Type": "application/x-ndjson"})[0] == 200
            sent.extend(x.decode() for x in lines)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    objects = s3_objects(s3, bucket)
    ext = ".jsonl.zst" if compression == "zstd" else ".jsonl.gz"
    assert objects and all(KEY_RE.match(k) and k.endswith(ext) for k in objects), list(objects)
    got = list(records_of(objects))
    assert len(got) == 2000
    assert sorted(r["body"] for _, r in got) == sorted(sent)  # exactly the payloads, once each
    for _, rec in got:
        assert list(rec) == ["ts", "ip", "user_agent", "cookie", "body", "id"]
        assert rec["ip"] == "127.0.0.1" and isinstance(rec["ts"], int)
    posts = [r for _, r in got if '"kind":"post"' in r["body"]]
    assert all(r["user_agent"] == "test-agent" and r["cookie"] == "sid=s1" for r in posts)
    assert len({r["id"] for _, r in got}) == 2000
