"""Outages are declared by the sinks (`Result.outage`) and read only by `delivery.judge`: an error
about the whole destination (a missing bucket, refused or expired credentials, a closed or blocked
index) keeps the batch; only a verdict about this batch sets it aside."""

from __future__ import annotations

import orjson
import pytest
from botocore.exceptions import ClientError

from estat_ingest.delivery import Next, judge
from estat_ingest.sinks.base import Outcome, Payload, Result
from estat_ingest.sinks.opensearch.documents import Doc
from estat_ingest.sinks.opensearch.items import Items, classify_status, read_items
from estat_ingest.sinks.s3 import classify_client_error

PAYLOAD = Payload("1700000000_t_000001.jsonl.gz", "dt=2023-11-15/hr=07", 3, b"x", "gzip", 1_700_000_000.0)


def client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize(("status", "code", "reason"), [
    (404, "NoSuchBucket", "no_bucket"), (403, "AccessDenied", "auth"), (403, "InvalidAccessKeyId", "auth"),
    (403, "SignatureDoesNotMatch", "auth"), (400, "ExpiredToken", "auth"), (400, "TokenRefreshRequired", "auth"),
    (400, "InvalidToken", "auth"), (403, "SomethingNew", "auth"), (301, "PermanentRedirect", "wrong_region"),
    (400, "AuthorizationHeaderMalformed", "wrong_region")])
def test_s3_destination_errors_are_outages(status: int, code: str, reason: str) -> None:
    result = classify_client_error(client_error(status, code))
    assert result.outage and result.reason == reason and not result.ok
    assert judge(result, PAYLOAD).next is Next.OUTAGE


@pytest.mark.parametrize(("status", "code", "nxt"), [
    (400, "InvalidArgument", Next.REJECTED), (400, "EntityTooLarge", Next.REJECTED),
    (503, "SlowDown", Next.RETRY), (500, "InternalError", Next.RETRY)])
def test_s3_errors_about_one_request_are_not_outages(status: int, code: str, nxt: Next) -> None:
    result = classify_client_error(client_error(status, code))
    assert not result.outage and judge(result, PAYLOAD).next is nxt


def error_body(kind: str) -> bytes:
    return orjson.dumps({"error": {"root_cause": [{"type": kind}], "type": kind, "reason": "r"}, "status": 400})


@pytest.mark.parametrize(("status", "body", "reason"), [
    (401, b"", "auth"), (403, b"", "auth"),
    (400, error_body("index_closed_exception"), "index_closed"),
    (403, error_body("cluster_block_exception"), "cluster_block"),
    (429, error_body("cluster_block_exception"), "cluster_block"),
    (404, error_body("index_not_found_exception"), "index_missing")])
def test_opensearch_destination_errors_are_outages(status: int, body: bytes, reason: str) -> None:
    result = classify_status(status, body)
    assert result is not None and result.outage and result.reason == reason
    assert judge(result, PAYLOAD).next is Next.OUTAGE


def test_opensearch_batch_errors_and_throttling_are_not_outages() -> None:
    for status, body, nxt in [(400, error_body("mapper_parsing_exception"), Next.REJECTED),
                              (413, b"", Next.REJECTED), (429, b"", Next.RETRY), (503, b"", Next.RETRY)]:
        result = classify_status(status, body)
        assert result is not None and not result.outage and judge(result, PAYLOAD).next is nxt, status


def doc(i: int) -> Doc:
    return Doc(line=b'{"i":%d}\n' % i, index="events-x", id=f"id{i}", body=b"")


def test_opensearch_items_of_a_closed_or_blocked_index_are_kept_not_rejected() -> None:
    docs = [doc(i) for i in range(4)]
    answer = orjson.dumps({"errors": True, "items": [
        {"create": {"status": 201}},
        {"create": {"status": 400, "error": {"type": "index_closed_exception", "reason": "closed"}}},
        {"create": {"status": 403, "error": {"type": "cluster_block_exception", "reason": "read-only"}}},
        {"create": {"status": 400, "error": {"type": "mapper_parsing_exception", "reason": "bad"}}}]})
    items = read_items(answer, docs)
    assert isinstance(items, Items)
    assert items.created == 1 and [d.id for d in items.retry] == ["id1", "id2"]
    assert [e["_id"] for _, e in items.rejected] == ["id3"]  # its own mapping error: set aside
    assert items.outage == "index_closed"


def test_judge_follows_the_outage_flag_with_a_remainder() -> None:
    rem = Payload(PAYLOAD.name, PAYLOAD.partition, 2, b"y", "gzip", PAYLOAD.first_ts)
    verdict = judge(Result(Outcome.RETRY, "index_closed", remainder=rem, delivered=1, outage=True), PAYLOAD)
    assert verdict.next is Next.OUTAGE and verdict.payload.num_events == 2 and verdict.delivered == 1
    # a reason alone never makes an outage: the sink declares it
    assert judge(Result(Outcome.REJECT, "auth"), PAYLOAD).next is Next.REJECTED
