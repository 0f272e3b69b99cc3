"""deploy/helm/estat-ingest: the chart renders what deploy/k8s renders, and its options work.

`helm template` with the default values must equal `kubectl kustomize deploy/k8s/base`, and with
`dlq.persistence.enabled` `kubectl kustomize deploy/k8s/shared-dlq`, object for object, after
removing what only the chart adds (Helm's standard labels, the config checksum that rolls pods on
a ConfigMap change, the PVC's keep policy) and the two values that are environment-specific in the
base (the image registry, the IRSA annotation). So every relation tests/deploy/test_k8s.py checks
on the base holds for the chart's defaults too. The PrometheusRule's groups equal
deploy/prometheus/alerts.yml apart from the scrape job.

helm and kubectl come from `make test` (deploy/helm/install_tools.py puts them in the venv's
bin/); without them these tests skip with a message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from estat_ingest.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "estat-ingest"
K8S = ROOT / "deploy" / "k8s"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
KUBE_VERSION = "1.30.0"  # the oldest the chart supports (Chart.yaml kubeVersion)

HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                    "app.kubernetes.io/version", "app.kubernetes.io/part-of"}
HELM_ONLY_ANNOTATIONS = {"checksum/config", "helm.sh/resource-policy"}


def tool(name: str) -> str:
    """The venv's copy (make test installs it there), else one on PATH; skip when there is none."""
    venv = Path(sys.executable).parent / name
    if venv.is_file():
        return str(venv)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (`make test` installs it with deploy/helm/install_tools.py); "
                    "chart test skipped")
    return found


def helm_template(*args: str, release: str = "estat-ingest", values: dict[str, Any] | None = None,
                  tmp_path: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [tool("helm"), "template", release, str(CHART), "--kube-version", KUBE_VERSION, *args]
    if values is not None:
        assert tmp_path is not None
        path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def render(*args: str, **kw: Any) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(helm_template(*args, **kw).stdout) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        assert d["kind"] not in out, f"two {d['kind']} objects"
        out[d["kind"]] = d
    return out


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def normalize(node: Any, key: str = "") -> Any:
    """Drop what only the chart adds; order lists of named things (their order means nothing)."""
    if isinstance(node, dict):
        out = {}
        label_map = key in ("labels", "matchLabels") or (key == "selector" and all(
            isinstance(v, str) for v in node.values()))  # a Service's selector is a plain label map
        for k, v in node.items():
            if label_map and k in HELM_ONLY_LABELS:
                continue
            if key == "annotations" and k in HELM_ONLY_ANNOTATIONS:
                continue
            v = normalize(v, k)
            if k in ("labels", "annotations") and v == {}:
                continue
            out[k] = v
        return out
    if isinstance(node, list):
        items = [normalize(v) for v in node]
        if items and all(isinstance(v, dict) for v in items):
            for sort_key in ("name", "mountPath"):
                if all(sort_key in v for v in items):
                    return sorted(items, key=lambda v: v[sort_key])
        return items
    return node


def keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    return {(d["kind"], d["metadata"]["name"]): normalize(d) for d in docs}


def base_environment() -> dict[str, Any]:
    """The base's two environment-specific values, as chart values."""
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    sa = yaml.safe_load((K8S / "base" / "serviceaccount.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == image["newTag"], "Chart.yaml appVersion and the base's image tag drifted apart"
    return {"image": {"repository": image["newName"]},
            "serviceAccount": {"annotations": sa["metadata"]["annotations"]}}


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append(f"{path}.{k}: only in the chart")
            elif k not in b:
                out.append(f"{path}.{k}: only in kustomize")
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: kustomize {a!r}, chart {b!r}"]


def assert_same_objects(kustomized: list[dict[str, Any]], charted: list[dict[str, Any]]) -> None:
    k, c = keyed(kustomized), keyed(charted)
    assert sorted(c) == sorted(k), f"objects differ: kustomize {sorted(k)}, chart {sorted(c)}"
    problems = [f"{kind}/{name}{d}" for (kind, name) in sorted(k) for d in diff(k[(kind, name)], c[(kind, name)])]
    assert not problems, "\n".join(problems)


def alerts_with_job(job: str) -> list[dict[str, Any]]:
    text = ALERTS.read_text()
    assert 'job="estat-ingest"' in text
    groups: list[dict[str, Any]] = yaml.safe_load(text.replace('job="estat-ingest"', f'job="{job}"'))["groups"]
    return groups


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    labels: dict[str, str] = by_kind(docs)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    return labels


# ------------------------------------------------------------------------------------ no helm needed


def test_chart_alerts_are_a_copy_of_deploy_prometheus_alerts() -> None:
    copy = CHART / "files" / "alerts.yml"
    assert copy.read_bytes() == ALERTS.read_bytes(), (
        "deploy/helm/estat-ingest/files/alerts.yml differs from deploy/prometheus/alerts.yml: "
        "cp deploy/prometheus/alerts.yml deploy/helm/estat-ingest/files/alerts.yml")


def test_values_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(v: Any, s: dict[str, Any], path: str) -> list[str]:
        if s.get("type") != "object" or "properties" not in s or not isinstance(v, dict):
            return []
        out = [f"{path}.{k}" for k in v if k not in s["properties"]]
        return out + [p for k, sub in s["properties"].items() if k in v for p in walk(v[k], sub, f"{path}.{k}")]

    assert schema["additionalProperties"] is False
    missing = walk(values, schema, "")
    assert not missing, f"values.yaml keys the schema does not describe: {missing}"
    assert set(schema["properties"]["ackMode"]["enum"]) == {"", "memory", "durable"}


def test_default_env_is_a_valid_configuration() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    env = {k: str(v) for k, v in values["env"].items()}
    from estat_ingest.config import VARIABLES

    read_by_server = {v.name for v in VARIABLES}
    assert not set(env) - read_by_server, f"variables the server does not read: {sorted(set(env) - read_by_server)}"
    s = Settings.from_env(env)
    assert s.http_port == values["containerPort"]
    assert values["terminationGracePeriodSeconds"] >= values["preStopSleepSeconds"] + s.shutdown_timeout_s + 10


# ------------------------------------------------------------------------------------ helm


def test_helm_lint(tmp_path: Path) -> None:
    for extra in ([], ["--set", "metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true,"
                               "dlq.persistence.enabled=true,ackMode=durable,autoscaling.enabled=false"]):
        out = subprocess.run([tool("helm"), "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *extra],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "0 chart(s) failed" in out.stdout


def test_defaults_render_the_kustomize_base(tmp_path: Path) -> None:
    charted = render(values=base_environment(), tmp_path=tmp_path)
    assert_same_objects(kustomize(K8S / "base"), charted)


def test_persistence_renders_the_shared_dlq_overlay(tmp_path: Path) -> None:
    values = base_environment() | {"dlq": {"persistence": {"enabled": True}}, "ackMode": "durable"}
    charted = render(values=values, tmp_path=tmp_path)
    assert_same_objects(kustomize(K8S / "shared-dlq"), charted)
    (cm,) = [d for d in charted if d["kind"] == "ConfigMap"]
    assert cm["data"]["ACK_MODE"] == "durable"  # a shared, persistent DLQ is where durable acks pay off
    (pvc,) = [d for d in charted if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", "uninstall must not delete a DLQ"


def test_existing_claim_is_mounted_not_created(tmp_path: Path) -> None:
    docs = render("--set", "dlq.persistence.enabled=true,dlq.persistence.existingClaim=my-efs-dlq")
    assert "PersistentVolumeClaim" not in by_kind(docs)
    spec = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    dlq_dir = by_kind(docs)["ConfigMap"]["data"]["DLQ_DIR"]
    assert volumes[mounts[dlq_dir]]["persistentVolumeClaim"] == {"claimName": "my-efs-dlq"}
    assert "emptyDir" in volumes[mounts["/var/lib/estat-ingest"]]


def test_ack_mode(tmp_path: Path) -> None:
    data = by_kind(render())["ConfigMap"]["data"]
    assert "ACK_MODE" not in data, "empty ackMode: the server's default"
    assert Settings.from_env(data).describe()["ACK_MODE"] == "memory"
    for mode in ("memory", "durable"):
        data = by_kind(render("--set", f"ackMode={mode}"))["ConfigMap"]["data"]
        assert data["ACK_MODE"] == mode
        assert Settings.from_env(data).describe()["ACK_MODE"] == mode  # what the server reads (DESIGN.md §10)
    bad = helm_template("--set", "ackMode=fsync", check=False)
    assert bad.returncode != 0 and "ackMode" in bad.stderr


def test_configmap_drives_ports_and_annotations(tmp_path: Path) -> None:
    docs = render("--set", "containerPort=9090,env.HTTP_ADDR=:9090")
    kinds = by_kind(docs)
    s = Settings.from_env(kinds["ConfigMap"]["data"])
    pod = kinds["Deployment"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert [p["containerPort"] for p in c["ports"]] == [s.http_port] == [9090]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert c["envFrom"] == [{"configMapRef": {"name": kinds["ConfigMap"]["metadata"]["name"]}}]
    # a changed ConfigMap changes the pod template, so the pods restart with the new environment
    other = by_kind(render("--set", "env.LOG_LEVEL=debug"))["Deployment"]["spec"]["template"]["metadata"]
    assert other["annotations"]["checksum/config"] != pod["metadata"]["annotations"]["checksum/config"]


def test_autoscaling_off_sets_replicas(tmp_path: Path) -> None:
    docs = render("--set", "autoscaling.enabled=false,replicaCount=3")
    assert "HorizontalPodAutoscaler" not in by_kind(docs)
    assert by_kind(docs)["Deployment"]["spec"]["replicas"] == 3
    assert "replicas" not in by_kind(render())["Deployment"]["spec"], "with the HPA, it owns the count"


def test_another_release_name_keeps_every_reference(tmp_path: Path) -> None:
    docs = render("--set", "dlq.persistence.enabled=true", release="edge")
    kinds = by_kind(docs)
    name = kinds["Deployment"]["metadata"]["name"]
    assert name == "edge-estat-ingest"
    assert all(d["metadata"]["name"].startswith(name) for d in docs)
    spec = kinds["Deployment"]["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == name
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {kinds["PersistentVolumeClaim"]["metadata"]["name"]}
    labels = pod_labels(docs)
    for selector in (kinds["Service"]["spec"]["selector"],
                     kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     kinds["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert labels["app.kubernetes.io/instance"] == "edge"  # two releases in one namespace select apart
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm", d["kind"]


def test_pod_monitor_scrapes_the_pods_with_the_rules_job(tmp_path: Path) -> None:
    docs = render("--set", "metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true,"
                           "metrics.podMonitor.labels.release=kube-prometheus-stack,metrics.podMonitor.interval=30s")
    kinds = by_kind(docs)
    pm = kinds["PodMonitor"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    labels = pod_labels(docs)
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    (c,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert endpoint["port"] in {p["name"] for p in c["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    # the operator names the job after this pod label: the rule's job must be its value
    job = labels[pm["spec"]["jobLabel"]]
    rules = [r for g in kinds["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]
    (down,) = [r for r in rules if r["alert"] == "EstatIngestDown"]
    assert down["expr"] == f'up{{job="{job}"}} == 0'
    assert "PodMonitor" not in by_kind(render()) and "PrometheusRule" not in by_kind(render())


@pytest.mark.parametrize("job", [None, "kubernetes-pods"])
def test_prometheus_rule_is_alerts_yml_apart_from_the_job(tmp_path: Path, job: str | None) -> None:
    args = "metrics.prometheusRule.enabled=true,metrics.prometheusRule.labels.role=alert-rules"
    if job is not None:
        args += f",metrics.prometheusRule.job={job}"
    rule = by_kind(render("--set", args))["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["role"] == "alert-rules"
    expected_job = job or "estat-ingest"
    groups = rule["spec"]["groups"]
    assert groups == alerts_with_job(expected_job)
    assert list(rule["spec"]) == ["groups"]
    if job is not None:
        assert groups != alerts_with_job("estat-ingest"), "the job value must reach the rules"
    # the alerts' own templates are kept for Prometheus, not expanded by Helm
    summaries = [r["annotations"]["summary"] for g in groups for r in g["rules"]]
    assert all("{{ $labels.instance }}" in s for s in summaries)


def test_chart_objects_validate_against_the_kubernetes_schema(tmp_path: Path) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (pip install kubernetes-validate); schema check skipped")
    docs = render("--set", "dlq.persistence.enabled=true,autoscaling.enabled=false,metrics.podMonitor.enabled=true")
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD, not in the Kubernetes schema
        kv.validate(d, KUBE_VERSION, strict=True)
