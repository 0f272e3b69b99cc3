"""deploy/k8s/: every manifest parses, and the fields the contract depends on hold.

Values are read with the server's own parser (Settings.from_env on the ConfigMap), so the timing
and size relations below are checked against what the server will actually use.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from estat_ingest.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
STATE_DIR = "/var/lib/estat-ingest"
APP_UID = 65532
MIN_K8S = "1.30.0"  # lifecycle.preStop.sleep (PodLifecycleSleepAction, beta and on by default)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    (d,) = docs(path)
    assert d["kind"] == kind, (path, d["kind"])
    return d


def deployment() -> dict:
    return one(BASE / "deployment.yaml", "Deployment")


def pod() -> dict:
    return deployment()["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = pod()["containers"]
    return c


def configmap() -> dict[str, str]:
    return one(BASE / "configmap.yaml", "ConfigMap")["data"]


def settings() -> Settings:
    return Settings.from_env(configmap() | {"API_KEYS": "probe:secret"})


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def quantity(text: str | int) -> float:
    m = QUANTITY.match(str(text))
    assert m, f"not a Kubernetes quantity: {text!r}"
    return float(m.group(1)) * FACTORS[m.group(2)]


def all_manifests() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


# ------------------------------------------------------------------------------------------------

def test_every_manifest_parses_and_is_named() -> None:
    files = all_manifests()
    assert len(files) >= 10
    for path in files:
        for d in docs(path):
            assert d.get("apiVersion") and d.get("kind"), path
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"].startswith("estat-ingest"), path


def test_base_kustomization_lists_every_base_manifest() -> None:
    k = one(BASE / "kustomization.yaml", "Kustomization")
    listed = set(k["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert "secret.example.yaml" not in listed, "placeholder keys must never be applied"
    (image,) = k["images"]
    assert image["name"] == container()["image"].split(":")[0]
    assert image["newTag"] not in ("", "latest")


def test_manifests_match_the_kubernetes_schema() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (pip install kubernetes-validate); schema check skipped")
    for path in all_manifests():
        for d in docs(path):
            if d["kind"] == "Kustomization" or (path.parent.name == "shared-dlq" and d["kind"] == "Deployment"):
                continue  # not resources / a partial patch
            kv.validate(d, MIN_K8S, strict=True)


def test_kustomize_renders_base_and_shared_dlq() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; `kubectl kustomize` rendering skipped")

    def render(path: Path) -> list[dict]:
        out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    base = render(BASE)
    assert sorted(d["kind"] for d in base) == sorted(
        ["ServiceAccount", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"])
    shared = render(K8S / "shared-dlq")
    (dep,) = [d for d in shared if d["kind"] == "Deployment"]
    spec = dep["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[settings().dlq_dir]]["persistentVolumeClaim"]["claimName"] == "estat-ingest-dlq"
    assert "emptyDir" in volumes[mounts[STATE_DIR]]
    assert any(d["kind"] == "PersistentVolumeClaim" for d in shared)


def test_configmap_is_a_valid_configuration_of_known_variables() -> None:
    from estat_ingest.config import VARIABLES

    read_by_server = {v.name for v in VARIABLES}
    assert "SHUTDOWN_TIMEOUT" in read_by_server
    unknown = set(configmap()) - read_by_server
    assert not unknown, f"variables the server does not read (typos?): {sorted(unknown)}"
    assert all(isinstance(v, str) for v in configmap().values()), "ConfigMap values must be strings"
    s = settings()  # raises ConfigError on any bad value
    assert s.http_port == 8080
    assert s.dlq_dir.startswith(STATE_DIR + "/")


def test_probes() -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings().http_port}
    ready, live, start = c["readinessProbe"], c["livenessProbe"], c["startupProbe"]
    assert ready["httpGet"] == {"path": "/ready", "port": "http"}
    assert live["httpGet"] == {"path": "/health", "port": "http"}
    assert start["httpGet"]["path"] == "/health"
    # a draining pod leaves the endpoints quickly; liveness is more patient than readiness
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 15
    assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]


def test_grace_period_covers_prestop_and_drain() -> None:
    spec, c = pod(), container()
    pre = c["lifecycle"]["preStop"]
    assert list(pre) == ["sleep"], "distroless has no shell or sleep binary: use the sleep action"
    delay = pre["sleep"]["seconds"]
    assert 3 <= delay <= 10
    shutdown = settings().shutdown_timeout_s
    assert "SHUTDOWN_TIMEOUT" in configmap()
    # the grace period starts with preStop; SIGTERM (and the drain budget) only after it
    assert spec["terminationGracePeriodSeconds"] >= delay + shutdown + 10
    text = (BASE / "deployment.yaml").read_text()
    assert '"/usr/bin/python3.11", "-c", "import time; time.sleep(5)"' in text, "document the exec fallback"


def test_resources() -> None:
    res = container()["resources"]
    req, lim = res["requests"], res["limits"]
    assert quantity(req["cpu"]) >= 1, "one process uses one core"
    assert "cpu" not in lim, "a CPU limit throttles the event loop"
    assert quantity(req["memory"]) <= quantity(lim["memory"])
    s = settings()
    batches = (s.upload_queue_batches + s.upload_concurrency + 1) * s.batch_max_bytes * 2  # raw + compressed
    queue = s.channel_size * s.max_body_bytes * 2
    assert batches + queue + 256 * 1024**2 <= quantity(lim["memory"])
    assert quantity(lim["ephemeral-storage"]) >= quantity(state_volume()["emptyDir"]["sizeLimit"])


def test_security_context() -> None:
    spec, c = pod(), container()
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == APP_UID and psc["fsGroup"] == APP_UID
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["runAsNonRoot"] is True
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc.get("privileged", False) is False
    assert spec["automountServiceAccountToken"] is False
    assert f"USER {APP_UID}" in (ROOT / "Dockerfile").read_text(), "image user must match runAsUser"


def state_volume() -> dict:
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert STATE_DIR in mounts, f"nothing mounted at {STATE_DIR}"
    (vol,) = [v for v in pod()["volumes"] if v["name"] == mounts[STATE_DIR]]
    return vol


def test_dlq_is_on_a_writable_volume_that_fits_its_cap() -> None:
    vol = state_volume()
    s = settings()
    assert s.dlq_dir.startswith(STATE_DIR + "/")
    limit = quantity(vol["emptyDir"]["sizeLimit"])
    # past sizeLimit the kubelet evicts the pod (and the emptyDir with it)
    assert 0 < s.dlq_max_size_bytes + s.dlq_min_free_bytes < limit
    assert not any(m.get("readOnly") for m in container()["volumeMounts"])


def test_env_from_configmap_and_optional_api_keys_secret() -> None:
    c = container()
    cm = one(BASE / "configmap.yaml", "ConfigMap")
    assert c["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    secret = one(K8S / "secret.example.yaml", "Secret")
    (api,) = [e for e in c["env"] if e["name"] == "API_KEYS"]
    ref = api["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    Settings.from_env({"API_KEYS": secret["stringData"][ref["key"]]})  # the example parses
    assert "API_KEYS" not in configmap()


def test_deployment_shape() -> None:
    d = deployment()
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in d["spec"], "the HPA owns the replica count"
    ru = d["spec"]["strategy"]["rollingUpdate"]
    assert ru["maxUnavailable"] == 0 and ru["maxSurge"] >= 1
    c = container()
    assert c["args"] == ["serve"]
    assert not c["image"].endswith(":latest") and ":" in c["image"]
    ann = d["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/path"] == "/metrics" and ann["prometheus.io/port"] == "8080"
    sa = one(BASE / "serviceaccount.yaml", "ServiceAccount")
    assert pod()["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["automountServiceAccountToken"] is False


def test_service_selects_the_pods() -> None:
    svc = one(BASE / "service.yaml", "Service")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container()["ports"]}


def test_hpa() -> None:
    hpa = one(BASE / "hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    d = deployment()
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", d["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 30 <= metric["resource"]["target"]["averageUtilization"] <= 80
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), "scale in one pod at a time"


def test_pdb_allows_drains_one_pod_at_a_time() -> None:
    pdb = one(BASE / "pdb.yaml", "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]


def test_shared_dlq_overlay() -> None:
    k = one(K8S / "shared-dlq" / "kustomization.yaml", "Kustomization")
    assert "../base" in k["resources"] and "pvc.yaml" in k["resources"]
    pvc = one(K8S / "shared-dlq" / "pvc.yaml", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every replica mounts the shared DLQ"
    patch = one(K8S / "shared-dlq" / "deployment-patch.yaml", "Deployment")
    spec = patch["spec"]["template"]["spec"]
    (mount,) = spec["containers"][0]["volumeMounts"]
    assert mount["mountPath"] == settings().dlq_dir
    (vol,) = spec["volumes"]
    assert vol["name"] == mount["name"]
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pod()["securityContext"]["fsGroup"] == APP_UID, "fsGroup makes the claim writable by the app"


def test_readme_explains_timing_and_dlq_storage() -> None:
    text = (K8S / "README.md").read_text().lower()
    for phrase in ("terminationgraceperiodseconds", "prestop", "shutdown_timeout", "emptydir",
                   "readwritemany", "lost", "1.30"):
        assert phrase in text, phrase
