"""Fixtures: moto's S3 server over real HTTP on 127.0.0.1, buckets, temporary directories."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, free_port, s3_client

# botocore reads credentials itself; tests use moto's dummy ones, never real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_var, None)


class Moto:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    m = Moto()
    m.start()
    yield m
    m.stop()


@pytest.fixture
def bucket(moto: Moto) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3_client(moto.endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(moto: Moto) -> Any:
    return s3_client(moto.endpoint)


@pytest.fixture
def spawn() -> Iterator[Callable[[dict[str, str], Path], ServerProcess]]:
    """Start servers; any still running at teardown (a failed start, a failed test) is killed."""
    made: list[ServerProcess] = []

    def start(env: dict[str, str], cwd: Path) -> ServerProcess:
        srv = ServerProcess(env, cwd)
        made.append(srv)
        return srv.start()

    yield start
    for srv in made:
        srv.kill()
