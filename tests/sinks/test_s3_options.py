"""S3 object options: storage class, server-side encryption and Content-Type on every PUT (read
back from moto with HeadObject), no Content-Encoding unless asked for, and bad values refused at
start with one line each."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import pytest

from estat_ingest.config import ConfigError, Settings
from estat_ingest.sinks.base import Payload
from estat_ingest.sinks.s3 import S3Sink

PART = "dt=2025-12-04/hr=13"
NAME = "1764821594_t_000001.jsonl.gz"


def put_one(settings: Settings) -> None:
    async def main() -> None:
        sink = S3Sink(settings)
        await sink.start()
        try:
            data = gzip.compress(b'{"a":1}\n')
            result = await sink.send(Payload(NAME, PART, 1, data, "gzip", 1764821594.0))
            assert result.ok, result
        finally:
            await sink.aclose()

    asyncio.run(main())


def s3_settings(moto: Any, bucket: str, **env: str) -> Settings:
    return Settings.from_env({"RAW_BUCKET": bucket, "AWS_REGION": "us-east-1", "S3_ENDPOINT_URL": moto.endpoint,
                              **env})


def head(s3: Any, bucket: str) -> dict[str, Any]:
    h: dict[str, Any] = s3.head_object(Bucket=bucket, Key=f"raw/{PART}/{NAME}")
    return h


def test_default_object_is_the_gzip_bytes_typed_application_gzip_without_content_encoding(
        moto: Any, bucket: str, s3: Any) -> None:
    put_one(s3_settings(moto, bucket))
    h = head(s3, bucket)
    assert h["ContentType"] == "application/gzip"
    assert "ContentEncoding" not in h  # a GET returns the .gz bytes to every client, decoded by none
    assert h.get("StorageClass", "STANDARD") == "STANDARD"
    body = s3.get_object(Bucket=bucket, Key=f"raw/{PART}/{NAME}")["Body"].read()
    assert gzip.decompress(body) == b'{"a":1}\n'


def test_storage_class_and_sse_kms_with_a_key_are_on_the_object(moto: Any, bucket: str, s3: Any) -> None:
    put_one(s3_settings(moto, bucket, S3_STORAGE_CLASS="standard_ia", S3_SSE="AWS:KMS",
                        S3_SSE_KMS_KEY_ID="arn:aws:kms:us-east-1:123456789012:key/k-1"))
    h = head(s3, bucket)
    assert h["StorageClass"] == "STANDARD_IA"
    assert h["ServerSideEncryption"] == "aws:kms"
    assert h["SSEKMSKeyId"] == "arn:aws:kms:us-east-1:123456789012:key/k-1"
    assert h["ContentType"] == "application/gzip"


@pytest.mark.parametrize("storage_class", ["INTELLIGENT_TIERING", "GLACIER_IR"])
def test_other_storage_classes_and_sse_s3(moto: Any, bucket: str, s3: Any, storage_class: str) -> None:
    put_one(s3_settings(moto, bucket, S3_STORAGE_CLASS=storage_class, S3_SSE="AES256"))
    h = head(s3, bucket)
    assert (h["StorageClass"], h["ServerSideEncryption"]) == (storage_class, "AES256")


def test_content_encoding_on_request_gives_vectors_headers(moto: Any, bucket: str, s3: Any) -> None:
    put_one(s3_settings(moto, bucket, S3_CONTENT_ENCODING="true"))
    h = head(s3, bucket)
    assert (h["ContentType"], h["ContentEncoding"]) == ("application/x-ndjson", "gzip")


def test_zstd_objects_are_typed_application_zstd() -> None:
    from estat_ingest.sinks.s3 import object_options

    s = Settings.from_env({"RAW_BUCKET": "b", "COMPRESSION": "zstd"})
    assert object_options(s) == {"ContentType": "application/zstd"}
    s = Settings.from_env({"RAW_BUCKET": "b", "COMPRESSION": "zstd", "S3_CONTENT_ENCODING": "true"})
    assert object_options(s) == {"ContentType": "application/x-ndjson", "ContentEncoding": "zstd"}


def test_bad_values_are_one_line_each_at_start() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"RAW_BUCKET": "b", "S3_STORAGE_CLASS": "COLD", "S3_SSE": "rot13"})
    assert err.value.problems == [
        "S3_STORAGE_CLASS='COLD' is invalid: expected one of STANDARD, STANDARD_IA, ONEZONE_IA, "
        "INTELLIGENT_TIERING, GLACIER_IR, GLACIER, DEEP_ARCHIVE, REDUCED_REDUNDANCY, EXPRESS_ONEZONE",
        "S3_SSE='rot13' is invalid: expected one of AES256, aws:kms, aws:kms:dsse",
    ]
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"RAW_BUCKET": "b", "S3_SSE": "AES256", "S3_SSE_KMS_KEY_ID": "k-1"})
    assert err.value.problems == [
        "S3_SSE='AES256' is invalid: expected aws:kms or aws:kms:dsse with S3_SSE_KMS_KEY_ID"]


def test_config_show_spells_the_options_as_the_api_does() -> None:
    shown = Settings.from_env({"S3_STORAGE_CLASS": "glacier_ir", "S3_SSE": "aws:kms:DSSE"}).describe()
    assert (shown["S3_STORAGE_CLASS"], shown["S3_SSE"], shown["S3_CONTENT_ENCODING"]) == (
        "GLACIER_IR", "aws:kms:dsse", "false")
