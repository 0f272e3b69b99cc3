"""Replays the image's install step, since Docker cannot run here.

The builder stage does, in a context made of the files its COPY lines name:

    python -m pip wheel --no-deps --wheel-dir /wheels .
    python -m pip install --only-binary=:all: --target /app/site /wheels/estat_ingest-*.whl

and the runtime runs `/usr/bin/python3.11 -m estat_ingest ...` with the ENV of the Dockerfile
(PYTHONPATH=/app/site, PYTHONSAFEPATH=1, ...). This test does the same with this machine's
Python 3.11, into a temporary /app/site, and runs the result with exactly the Dockerfile's ENV
(paths moved into the temporary directory) and nothing else from the environment:

- `-S` stands in for distroless, whose interpreter has no site-packages of its own: without it
  the venv running the tests would be on sys.path. (`python -I` cannot be used: it ignores
  PYTHONPATH, which is how the image finds its packages.)
- the working directory is an empty temporary directory, so the checkout is not importable.

It then checks that every module, estat_ingest's and its dependencies', is loaded from the
target directory, and that `--version`, `config show`, `healthcheck` and `serve` work from it.
pip needs the package index (or its cache) for the dependencies.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerfile_model import ROOT, parse

pytestmark = pytest.mark.skipif(sys.version_info[:2] != (3, 11),
                                reason="the image runs CPython 3.11; its wheels need the same minor here")

IMAGE_SITE = "/app/site"
IMAGE_STATE = "/var/lib/estat-ingest"
DEPENDENCIES = ("aiohttp", "aiobotocore", "botocore", "orjson", "prometheus_client", "zstandard", "uvloop",
                "tzdata", "multidict", "yarl")


class Image:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.site = root / "app" / "site"
        self.state = root / "state"
        self.cwd = root / "cwd"

    def env(self, **extra: str) -> dict[str, str]:
        """The runtime stage's ENV, with the image paths moved under the temporary root."""
        _, stages = parse()
        env = {}
        for key, value in stages[-1].env().items():
            value = value.replace(IMAGE_SITE, str(self.site)).replace(IMAGE_STATE, str(self.state))
            env[key] = value
        env["LANG"] = "C.UTF-8"  # set by the distroless python image
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        """The ENTRYPOINT with this interpreter in place of /usr/bin/python3.11, plus -S."""
        _, stages = parse()
        entry = next(i for i in reversed(stages[-1].instructions) if i.cmd == "ENTRYPOINT").exec_form()
        assert entry is not None and entry[0].startswith("/usr/bin/python3")
        return [sys.executable, "-S", *entry[1:], *args]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), cwd=self.cwd, env=env or self.env(), capture_output=True,
                              text=True, timeout=timeout)


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("image")
    img = Image(root)
    # the build context: exactly what the builder's COPY lines take
    _, stages = parse()
    context = root / "context"
    context.mkdir()
    for copy in (i for i in stages[0].instructions if i.cmd == "COPY" and "from" not in i.flags()):
        for src in copy.operands()[:-1]:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: missing in the repository, `docker build` would fail"
            if path.is_dir():
                shutil.copytree(path, context / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
            else:
                shutil.copy2(path, context / src)
    wheels = root / "wheels"
    _pip("wheel", "--no-deps", "--wheel-dir", str(wheels), ".", cwd=context)
    (wheel,) = wheels.glob("estat_ingest-*.whl")
    _pip("install", "--only-binary=:all:", "--target", str(img.site), str(wheel), cwd=root)
    shutil.rmtree(img.site / "bin", ignore_errors=True)
    for sub in ("dlq", "data", "tmp"):  # the builder's mkdir -p /state/var/lib/estat-ingest/...
        (img.state / sub).mkdir(parents=True)
    img.cwd.mkdir()
    return img


def test_version(image: Image) -> None:
    from estat_ingest import __version__

    out = image.run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"estat-ingest {__version__}"


def test_every_module_comes_from_the_target_directory(image: Image) -> None:
    probe = (
        "import importlib, json, pkgutil, sys\n"
        "import estat_ingest\n"
        "failed = {}\n"
        "for m in pkgutil.walk_packages(estat_ingest.__path__, 'estat_ingest.'):\n"
        "    if m.name.endswith('__main__'):\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as e:\n"
        "        failed[m.name] = repr(e)\n"
        f"deps = {{d: importlib.import_module(d).__file__ for d in {DEPENDENCIES!r}}}\n"
        "files = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}\n"
        "print(json.dumps({'path': sys.path, 'prefix': sys.prefix, 'failed': failed, 'deps': deps,\n"
        "                  'main': estat_ingest.__file__, 'files': files}))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=image.cwd, env=image.env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    site = str(image.site)
    assert report["failed"] == {}, "modules that do not import from the image's site directory"
    assert report["main"].startswith(site + os.sep), report["main"]
    for dep, file in report["deps"].items():
        assert file and file.startswith(site + os.sep), f"{dep} loaded from {file}"
    # sys.path: the target directory, then the interpreter's standard library and nothing else
    assert report["path"][0] == site
    stdlib = [p for p in report["path"][1:] if not p.startswith(report["prefix"])]
    assert stdlib == [], f"unexpected sys.path entries: {stdlib}"
    assert not any("site-packages" in p or "dist-packages" in p for p in report["path"])
    # nothing at all was imported from the checkout or the test venv
    for name, file in report["files"].items():
        if file and not file.startswith((site, report["prefix"])):
            pytest.fail(f"{name} imported from {file}")


def test_the_image_holds_the_compiled_extension(image: Image) -> None:
    """The builder compiles estat_ingest/_speedups.c into the wheel (the Dockerfile installs gcc in
    that stage): the server in the image runs the C loops, not their Python fallback."""
    probe = ("import estat_ingest._speedups as s, estat_ingest.http.bodies as b, estat_ingest.pipeline.record as r\n"
             "print(s.__file__)\n"
             "print(b._c_split_lines is s.split_lines and r._c_records is s.records and r._c_record is s.record)\n")
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=image.cwd, env=image.env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    file, used = out.stdout.split()
    assert file.startswith(str(image.site) + os.sep) and file.endswith(".so"), file
    assert used == "True"


def test_config_show_from_the_image_environment(image: Image) -> None:
    out = image.run("config", "show", "--json", env=image.env(API_KEYS="web:not-for-your-eyes"))
    assert out.returncode == 0, out.stderr
    assert "not-for-your-eyes" not in out.stdout, "secrets must be masked"
    cfg = {name: item["value"] for name, item in json.loads(out.stdout).items()}
    assert cfg["HTTP_ADDR"] == "0.0.0.0:8080"
    assert cfg["DLQ_DIR"] == str(image.state / "dlq")
    assert cfg["FILE_SINK_DIR"] == str(image.state / "data")
    assert cfg["SINKS"] == "file"
    assert cfg["API_KEYS"] == "web:***"


def test_bad_configuration_is_one_line_and_exit_2(image: Image) -> None:
    out = image.run("config", "show", env=image.env(SHUTDOWN_TIMEOUT="soon"))
    assert out.returncode == 2
    assert "SHUTDOWN_TIMEOUT" in out.stderr and len(out.stderr.strip().splitlines()) == 1


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/health" else 503
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthcheck_command(image: Image, health_server: int) -> None:
    ok = image.run("healthcheck", "--url", f"http://127.0.0.1:{health_server}/health", timeout=30)
    assert ok.returncode == 0, ok.stderr
    bad = image.run("healthcheck", "--url", f"http://127.0.0.1:{health_server}/nope", timeout=30)
    assert bad.returncode == 1
    down = image.run("healthcheck", "--url", f"http://127.0.0.1:{_free_port()}/health", timeout=30)
    assert down.returncode == 1


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_serve_from_the_image_accepts_an_event_and_drains_on_sigterm(image: Image) -> None:
    port = _free_port()
    env = image.env(HTTP_ADDR=f"127.0.0.1:{port}", INSTANCE_ID="image-test", FLUSH_INTERVAL="1h")
    proc = subprocess.Popen(image.argv("serve"), cwd=image.cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if _get(f"http://127.0.0.1:{port}/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/collect", data=b'{"e":"image-test"}',
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b"ingest_events_accepted_total 1.0" in body
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    written = sorted((image.state / "data").rglob("*.jsonl.gz"))
    assert len(written) == 1, (written, out)
    assert b"image-test" in __import__("gzip").decompress(written[0].read_bytes())
