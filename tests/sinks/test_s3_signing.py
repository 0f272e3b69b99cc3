"""The S3 sink signs its own requests (botocore's S3SigV4Auth, no SDK client): against a moto
server that checks every request's signature as S3 does, PutObject, HeadBucket and DeleteObject
succeed with the right secret for keys shaped like ours (`=`, `+`, `~`, spaces), and a wrong
secret is an outage (`auth`), never a rejected batch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from estat_ingest.config import Settings
from estat_ingest.sinks.base import Outcome, Payload
from estat_ingest.sinks.s3 import S3Client, S3Sink
from tests.helpers import free_port

POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'


@pytest.fixture(scope="module")
def signed_moto() -> Iterator[tuple[str, str, str]]:
    """(endpoint, access key, secret) of a moto server that authenticates every request after the
    first four (the IAM user, its policy and key, the bucket)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server with authentication did not start")
            time.sleep(0.05)
        endpoint = f"http://127.0.0.1:{port}"
        kw: dict[str, Any] = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "boot",
                              "aws_secret_access_key": "boot"}
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="ingest")
        iam.put_user_policy(UserName="ingest", PolicyName="all", PolicyDocument=POLICY)
        key = iam.create_access_key(UserName="ingest")["AccessKey"]
        boto3.client("s3", **kw).create_bucket(Bucket="signed-bucket")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def settings(endpoint: str, **env: str) -> Settings:
    return Settings.from_env({"RAW_BUCKET": "signed-bucket", "AWS_REGION": "us-east-1", "S3_ENDPOINT_URL": endpoint,
                              "S3_STORAGE_CLASS": "STANDARD_IA", **env})


def test_signed_requests_are_accepted_and_a_wrong_secret_is_an_outage(
        signed_moto: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, key_id, secret = signed_moto
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)

    async def run() -> None:
        sink = S3Sink(settings(endpoint))
        await sink.start()
        try:
            for name in ("1764821594_t_000001.jsonl.gz", "1764821594_host+w0~a b=c_000002.jsonl.gz"):
                result = await sink.send(Payload(name, "dt=2025-12-04/hr=13", 1, b"\x1f\x8bdata", "gzip", 1764821594.0))
                assert result.ok, result
            probe = await sink.probe()  # PUT and DELETE under _estat_validate/
            assert not probe.problems, probe.problems
            await sink._client.request("HEAD", "signed-bucket", "")
        finally:
            await sink.aclose()
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        bad = S3Sink(settings(endpoint))
        await bad.start()
        try:
            result = await bad.send(Payload("x.jsonl.gz", "dt=2025-12-04/hr=13", 1, b"x", "gzip", 1764821594.0))
        finally:
            await bad.aclose()
        assert result.outcome is Outcome.REJECT and result.outage and result.reason == "auth", result
        assert "SignatureDoesNotMatch" in result.error

    asyncio.run(run())
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                      aws_secret_access_key=secret)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="signed-bucket")["Contents"])
    assert keys == ["raw/dt=2025-12-04/hr=13/1764821594_host+w0~a b=c_000002.jsonl.gz",
                    "raw/dt=2025-12-04/hr=13/1764821594_t_000001.jsonl.gz"]
    head = s3.head_object(Bucket="signed-bucket", Key=keys[1])
    assert head["ContentType"] == "application/gzip" and head["StorageClass"] == "STANDARD_IA"


@pytest.mark.parametrize(("region", "bucket", "url"), [
    ("ap-northeast-2", "raw-events", "https://raw-events.s3.ap-northeast-2.amazonaws.com/raw/dt%3D1/a%2Bb~c.gz"),
    ("us-east-1", "raw.events", "https://s3.us-east-1.amazonaws.com/raw.events/raw/dt%3D1/a%2Bb~c.gz"),
    ("cn-north-1", "raw-events", "https://raw-events.s3.cn-north-1.amazonaws.com.cn/raw/dt%3D1/a%2Bb~c.gz"),
])
def test_aws_urls_are_regional_and_virtual_hosted_unless_the_name_has_a_dot(region: str, bucket: str, url: str) -> None:
    c = S3Client(Settings.from_env({"RAW_BUCKET": bucket, "AWS_REGION": region}))
    assert c.url(bucket, "raw/dt=1/a+b~c.gz") == url
    assert S3Client(settings("http://minio:9000/")).url("b", "k/x=1") == "http://minio:9000/b/k/x%3D1"
