"""Fixtures: moto's S3 server over real HTTP on 127.0.0.1, buckets, temporary directories, and the
HTTP front of the servers a test starts.

A test module with `FRONTS = ("aiohttp", "fast")` runs once per HTTP front: the module-scoped
`front` fixture sets `HTTP_FRONT` in this process's environment, which every `ServerProcess`
(tests/helpers.py) passes on to `estat-ingest serve`. In other modules `front` is whatever
`HTTP_FRONT` already is, else the server's default (`fast`), so `HTTP_FRONT=aiohttp pytest
tests/e2e` runs every server-process test against the aiohttp front.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import DEFAULT_FRONT, ServerProcess, free_port, s3_client

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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    fronts = getattr(metafunc.module, "FRONTS", None)
    if fronts and "front" in metafunc.fixturenames:
        metafunc.parametrize("front", fronts, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def front(request: pytest.FixtureRequest) -> Iterator[str]:
    """The HTTP front of the servers this module's tests start ("aiohttp" or "fast")."""
    value = getattr(request, "param", None)
    if value is None:
        yield os.environ.get("HTTP_FRONT", DEFAULT_FRONT)
        return
    old = os.environ.get("HTTP_FRONT")
    os.environ["HTTP_FRONT"] = value
    try:
        yield value
    finally:
        if old is None:
            os.environ.pop("HTTP_FRONT", None)
        else:
            os.environ["HTTP_FRONT"] = old


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
