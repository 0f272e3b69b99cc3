"""Object names/keys (v1 layout), event ids and the record line format."""

from __future__ import annotations

import orjson

from estat_ingest.formats.keys import NAME_RE, Namer, join_key, partition, unix_of_name
from estat_ingest.pipeline.record import IdGen, encode_record


def test_partition_is_in_partition_tz() -> None:
    ts = 1764821594  # 2025-12-04T04:13:14Z = 13:13 in Seoul
    assert partition(ts, "Asia/Seoul") == "dt=2025-12-04/hr=13"
    assert partition(ts, "UTC") == "dt=2025-12-04/hr=04"
    assert partition(1764860400, "Asia/Seoul") == "dt=2025-12-05/hr=00"  # 15:00Z = midnight KST


def test_key_has_no_double_slash() -> None:
    assert join_key("raw/", "dt=2025-12-04/hr=13", "n.jsonl.gz") == "raw/dt=2025-12-04/hr=13/n.jsonl.gz"
    assert join_key("", "dt=2025-12-04/hr=13", "n.jsonl.gz") == "dt=2025-12-04/hr=13/n.jsonl.gz"
    assert "//" not in join_key("a//b/", "/dt=x/hr=y/", "n")


def test_names_follow_v1_and_never_collide_between_processes() -> None:
    a, b = Namer("ip-10-0-1-23", ".jsonl.gz"), Namer("ip-10-0-1-23", ".jsonl.gz")
    names = {a.next(1764821594) for _ in range(1000)} | {b.next(1764821594) for _ in range(1000)}
    assert len(names) == 2000
    n = a.next(1764821594.9)
    m = NAME_RE.match(n)
    assert m and m.group("unix") == "1764821594" and m.group("counter") == "001001"
    assert m.group("instance").startswith("ip-10-0-1-23-") and "/" not in m.group("instance")
    assert unix_of_name(n) == 1764821594
    assert Namer("host_with_underscores", ".jsonl.zst", worker=3).next(1).endswith(".jsonl.zst")
    assert unix_of_name("1764821594_host_with_under_scores_000042.jsonl.gz") == 1764821594  # v1 names parse


def test_counter_wraps_like_v1() -> None:
    n = Namer("h", ".jsonl.gz")
    n._counter = 999_998
    assert n.next(1).endswith("_999999.jsonl.gz")
    assert n.next(1).endswith("_000001.jsonl.gz")


def test_ids_unique_and_sorted_by_receive_time() -> None:
    g1, g2 = IdGen(), IdGen()
    ids = []
    t = 1764821594.0
    for i in range(3000):
        gen = g1 if i % 2 else g2
        ids.append(gen.next(t + i * 0.001))
    assert len(set(ids)) == 3000
    assert ids == sorted(ids)  # across two generators, order = time order
    same_ms = [g1.next(t + 10) for _ in range(100)]
    assert same_ms == sorted(same_ms)


def test_record_line_field_order_and_body_kept_exactly() -> None:
    body = '{"ev":"click","p":"/a?b=1&c=2","u":"\u2028<x>"}'
    line = encode_record(1764821594.7, "203.0.113.7", "Mozilla/5.0", "sid=abc; x=1", body, "id1")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    rec = orjson.loads(line)
    assert list(rec) == ["ts", "ip", "user_agent", "cookie", "body", "id"]
    assert rec == {"ts": 1764821594, "ip": "203.0.113.7", "user_agent": "Mozilla/5.0",
                   "cookie": "sid=abc; x=1", "body": body, "id": "id1"}
