"""Lint of the Dockerfile, .dockerignore and deploy/docker.mk (Docker itself cannot run here).

test_image_install.py replays the install step; this file checks the structure the runtime
depends on: base images with one Python minor, non-root, exec form everywhere (the runtime has no
shell), signals, port, and a writable state directory.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from dockerfile_model import DOCKERFILE, ROOT, Stage, in_context, parse

BUILDER_RE = re.compile(r"^python:(3\.\d+)-slim(?:-bookworm)?(?:@sha256:[0-9a-f]{64})?$")
RUNTIME_RE = re.compile(r"^gcr\.io/distroless/python3-(debian\d+)(?::(?:nonroot|latest))?(?:@sha256:[0-9a-f]{64})?$")
# the CPython minor each distroless python3 image ships (Debian's python3)
DISTROLESS_PYTHON = {"debian12": "3.11"}
APP_UID = "65532"
STATE_DIR = "/var/lib/estat-ingest"
SITE_DIR = "/app/site"


def stages() -> list[Stage]:
    return parse()[1]


def builder() -> Stage:
    return stages()[0]


def runtime() -> Stage:
    return stages()[-1]


def test_two_stages_from_the_expected_images() -> None:
    s = stages()
    assert len(s) == 2, [st.base for st in s]
    assert s[0].name == "builder"
    assert BUILDER_RE.match(s[0].base), s[0].base
    assert RUNTIME_RE.match(s[1].base), s[1].base


def test_same_python_minor_in_builder_runtime_and_entrypoint() -> None:
    builder_minor = BUILDER_RE.match(builder().base).group(1)
    distro = RUNTIME_RE.match(runtime().base).group(1)
    assert DISTROLESS_PYTHON[distro] == builder_minor, "cp3xx wheels from the builder must load in the runtime"
    entry = runtime().last("ENTRYPOINT").exec_form()
    assert entry[0] == f"/usr/bin/python{builder_minor}"


def test_runtime_is_non_root_and_shell_free() -> None:
    rt = runtime()
    user = rt.last("USER")
    assert user is not None
    uid = user.args.split(":")[0]
    assert uid == APP_UID, "numeric, so Kubernetes runAsNonRoot can verify it"
    assert user.args in (APP_UID, f"{APP_UID}:{APP_UID}")
    assert rt.all("RUN") == [], "distroless has no shell: RUN cannot work in the runtime stage"
    for ins in rt.instructions:
        if ins.cmd in ("ENTRYPOINT", "CMD"):
            assert ins.exec_form() is not None, f"{ins.cmd} must be exec form (no /bin/sh in distroless)"


def test_entrypoint_serve_signal_port() -> None:
    rt = runtime()
    assert rt.last("ENTRYPOINT").exec_form() == ["/usr/bin/python3.11", "-m", "estat_ingest"]
    assert rt.last("CMD").exec_form() == ["serve"]
    assert rt.last("STOPSIGNAL").args == "SIGTERM"
    assert rt.last("EXPOSE").args.split() == ["8080"]
    assert rt.env()["HTTP_ADDR"] == ":8080"


def test_healthcheck_is_exec_form_app_command() -> None:
    hc = runtime().last("HEALTHCHECK")
    assert hc is not None
    cmd = hc.args[hc.args.index("CMD ") + 4:]
    from dockerfile_model import Instruction

    argv = Instruction("CMD", cmd).exec_form()
    assert argv == [*runtime().last("ENTRYPOINT").exec_form(), "healthcheck"]
    timeout = re.search(r"--timeout=(\d+)s", hc.args)
    assert timeout and int(timeout.group(1)) >= 3


def test_state_directory_is_writable_by_the_app_user() -> None:
    rt, env = runtime(), runtime().env()
    for var in ("DLQ_DIR", "FILE_SINK_DIR", "TMPDIR"):
        assert env[var].startswith(STATE_DIR + "/"), var
    # created in the builder (no mkdir in distroless) ...
    run = " ".join(i.args for i in builder().all("RUN"))
    for var in ("DLQ_DIR", "FILE_SINK_DIR", "TMPDIR"):
        assert f"/state{env[var]}" in run, f"{env[var]} is not created in the builder"
    # ... and copied owned by the app user
    copies = [c for c in rt.all("COPY") if c.operands()[-1] == STATE_DIR]
    assert len(copies) == 1
    assert copies[0].flags()["from"] == "builder"
    assert copies[0].flags()["chown"] in (f"{APP_UID}:{APP_UID}", APP_UID)
    # ECS copies a VOLUME's content and owner into a bind mount at the same path
    assert rt.last("VOLUME").exec_form() == [STATE_DIR]
    assert rt.last("WORKDIR").args == STATE_DIR, "FILE_SINK_DIR=./data would otherwise be read-only"


def test_code_is_root_owned_and_found_through_pythonpath() -> None:
    rt, env = runtime(), runtime().env()
    copies = [c for c in rt.all("COPY") if c.operands()[-1] == SITE_DIR]
    assert len(copies) == 1 and copies[0].flags() == {"from": "builder"}, "code must not be writable by the app"
    assert env["PYTHONPATH"] == SITE_DIR
    assert env["PYTHONSAFEPATH"] == "1" and env["PYTHONNOUSERSITE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1", "logs must reach the collector before a crash"


def test_builder_installs_the_wheel_into_one_directory() -> None:
    run = " ".join(i.args for i in builder().all("RUN"))
    assert "python -m pip wheel --no-deps --wheel-dir /wheels ." in run
    assert f"python -m pip install --only-binary=:all: --target {SITE_DIR} /wheels/estat_ingest-*.whl" in run
    assert f"PYTHONPATH={SITE_DIR} PYTHONSAFEPATH=1 python -S -m estat_ingest --version" in run


def test_only_the_builder_has_a_compiler() -> None:
    """estat_ingest/_speedups.c is compiled by `pip wheel` in the builder; the runtime has none."""
    run = " ".join(i.args for i in builder().all("RUN"))
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in run
    assert "rm -rf /var/lib/apt/lists/*" in run
    runtime = [i for i in stages()[1].instructions if i.cmd == "RUN"]
    assert runtime == [], "the distroless runtime has no shell to RUN anything"


def test_build_context_is_an_allowlist() -> None:
    sources = [op for c in builder().all("COPY") if "from" not in c.flags() for op in c.operands()[:-1]]
    assert set(sources) == {"pyproject.toml", "README.md", "estat_ingest"}
    for src in sources:
        assert in_context(src), f"COPY {src} is excluded by .dockerignore"
    assert in_context("estat_ingest/config.py") and in_context("estat_ingest/sinks/s3.py")
    for secret_or_junk in (".env", ".git/config", ".venv/bin/python", "tests/deploy/test_k8s.py", "data/x.jsonl.gz",
                           "estat_ingest/__pycache__/config.cpython-311.pyc", "deploy/ecs/task-definition.json",
                           "bench/results.json", "docs/ops.md"):
        assert not in_context(secret_or_junk), f"{secret_or_junk} would be sent to the builder"


def test_no_secret_or_latest_tag_in_the_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert ":latest" not in text
    assert not re.search(r"(?i)(api_keys|password|secret|aws_access_key_id)\s*=", text)


def _make(*args: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    out = subprocess.run([make, "--no-print-directory", "-n", "-f", str(ROOT / "deploy" / "docker.mk"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_push_logs_in_to_ecr_and_pushes() -> None:
    out = _make("push", "AWS_ACCOUNT_ID=111122223333", "AWS_REGION=eu-west-1", "TAG=v9", "IMAGE_NAME=ingest")
    registry = "111122223333.dkr.ecr.eu-west-1.amazonaws.com"
    lines = [line.strip() for line in out.splitlines()]
    assert "docker build --platform linux/amd64 -t ingest:v9 ." in lines
    assert (f"aws ecr get-login-password --region eu-west-1 | docker login --username AWS "
            f"--password-stdin {registry}") in lines
    assert f"docker tag ingest:v9 {registry}/ingest:v9" in lines
    assert lines[-1] == f"docker push {registry}/ingest:v9"


def test_make_run_local_uses_env_file_and_port() -> None:
    out = " ".join(_make("run-local", "TAG=v9").split())
    assert "--env-file .env" in out and "-p 8080:8080" in out
    assert "--read-only" in out and "--cap-drop ALL" in out
    stop = int(re.search(r"--stop-timeout (\d+)", out).group(1))
    assert stop > 25, "docker stop's default 10 s would cut the 25 s drain"
    assert out.rstrip().endswith("estat-ingest:v9")


def test_make_fragment_keeps_the_including_makefile_default_goal(tmp_path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    (tmp_path / "Makefile").write_text(f"include {ROOT}/deploy/docker.mk\nall:\n\t@echo default-goal\n")
    out = subprocess.run([make, "-n"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "default-goal" in out.stdout, out.stdout + out.stderr
