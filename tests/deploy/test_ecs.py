"""deploy/ecs/: task definitions, service, autoscaling and IAM policies.

Every AWS request file is validated against botocore's own service model (the same check the
AWS CLI does before sending), then the values are checked against the contract: shutdown timing,
health check, logs, storage, least privilege; the ADOT variant's collector config against the
task definition, the IAM policies and the alert rules; the load balancer's rules against the
routes that must stay private.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from estat_ingest.config import Settings

ROOT = Path(__file__).resolve().parents[2]
ECS = ROOT / "deploy" / "ecs"
TASK_DEFS = ["task-definition.json", "task-definition-efs.json", "task-definition-adot.json"]
STATE_DIR = "/var/lib/estat-ingest"
FARGATE_MAX_STOP_TIMEOUT = 120

# file -> (botocore service, operation whose input it is)
REQUESTS = {
    "task-definition.json": ("ecs", "RegisterTaskDefinition"),
    "task-definition-efs.json": ("ecs", "RegisterTaskDefinition"),
    "task-definition-adot.json": ("ecs", "RegisterTaskDefinition"),
    "service.json": ("ecs", "CreateService"),
    "autoscaling-target.json": ("application-autoscaling", "RegisterScalableTarget"),
    "autoscaling-policy.json": ("application-autoscaling", "PutScalingPolicy"),
    "target-group.json": ("elbv2", "CreateTargetGroup"),
    "target-group-attributes.json": ("elbv2", "ModifyTargetGroupAttributes"),
    "listener-default-action.json": ("elbv2", "ModifyListener"),
    "listener-rule-collect.json": ("elbv2", "CreateRule"),
}
POLICIES = ["task-role-policy.json", "task-role-policy-efs.json", "task-role-policy-adot.json",
            "execution-role-policy.json", "execution-role-policy-adot.json"]
# the only actions AWS does not let you scope to a resource
RESOURCE_STAR_ALLOWED = {"ecr:GetAuthorizationToken"}


def load(name: str) -> dict:
    return json.loads((ECS / name).read_text())


APP = "estat-ingest"  # the server's container (the ADOT variant has a collector beside it)
COLLECTOR = "aws-otel-collector"


def container(name: str = "task-definition.json", which: str = APP) -> dict:
    (c,) = [c for c in load(name)["containerDefinitions"] if c["name"] == which]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["environment"]}


def settings(c: dict) -> Settings:
    values = env(c) | {s["name"]: "probe:secret" for s in c.get("secrets", []) if s["name"] == "API_KEYS"}
    return Settings.from_env(values)


def entrypoint_python() -> str:
    m = re.search(r'^ENTRYPOINT\s+(\[.*\])\s*$', (ROOT / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(m.group(1))[0]


def test_every_json_file_is_covered() -> None:
    files = {p.name for p in ECS.glob("*.json")}
    assert files == set(REQUESTS) | set(POLICIES) | {"trust-policy.json"}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_matches_the_aws_api_model(name: str) -> None:
    botocore = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    service, operation = REQUESTS[name]
    shape = botocore.get_session().get_service_model(service).operation_model(operation).input_shape
    report = ParamValidator().validate(load(name), shape)
    assert not report.has_errors(), report.generate_report()


@pytest.mark.parametrize("name", TASK_DEFS)
def test_environment_is_a_valid_configuration(name: str) -> None:
    s = settings(container(name))  # raises ConfigError on any bad value
    assert s.sinks == ("s3",) and s.raw_bucket
    assert s.http_port == 8080
    assert s.dlq_dir.startswith(STATE_DIR + "/")


@pytest.mark.parametrize("name", TASK_DEFS)
def test_stop_timeout_exceeds_shutdown_timeout(name: str) -> None:
    c = container(name)
    shutdown = settings(c).shutdown_timeout_s
    assert "SHUTDOWN_TIMEOUT" in env(c), "set SHUTDOWN_TIMEOUT explicitly next to stopTimeout"
    assert c["stopTimeout"] >= shutdown + 10, (c["stopTimeout"], shutdown)
    assert c["stopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT


def test_health_check_runs_the_app_without_a_shell() -> None:
    hc = container()["healthCheck"]
    cmd = hc["command"]
    assert cmd[0] == "CMD", "CMD-SHELL needs /bin/sh, which distroless does not have"
    assert cmd[1] == entrypoint_python(), "health check must use the image's interpreter"
    assert cmd[2:] == ["-m", "estat_ingest", "healthcheck"]
    assert 5 <= hc["interval"] <= 300 and 2 <= hc["timeout"] <= 60 and 1 <= hc["retries"] <= 10
    assert hc["timeout"] < hc["interval"]
    assert 0 < hc["startPeriod"] <= 300


def test_awslogs_non_blocking() -> None:
    c = container()
    log = c["logConfiguration"]
    assert log["logDriver"] == "awslogs"
    opts = log["options"]
    assert opts["awslogs-group"] == "/ecs/estat-ingest"
    assert opts["awslogs-region"] == settings(c).aws_region
    assert opts["awslogs-stream-prefix"]
    # blocking mode stalls the event loop on stdout when CloudWatch Logs is slow
    assert opts["mode"] == "non-blocking" and opts["max-buffer-size"]
    assert settings(c).log_format == "json"


def test_container_runs_non_root_read_only_with_a_writable_state_volume() -> None:
    td = load("task-definition.json")
    c = container()
    assert td["requiresCompatibilities"] == ["FARGATE"] and td["networkMode"] == "awsvpc"
    assert c["user"].split(":")[0] == "65532"
    assert c["readonlyRootFilesystem"] is True
    assert c["essential"] is True
    assert [p["containerPort"] for p in c["portMappings"]] == [8080]
    mounts = {m["containerPath"]: m for m in c["mountPoints"]}
    assert mounts[STATE_DIR]["readOnly"] is False
    volumes = {v["name"]: v for v in td["volumes"]}
    assert volumes[mounts[STATE_DIR]["sourceVolume"]] == {"name": mounts[STATE_DIR]["sourceVolume"]}, \
        "the state volume is a Fargate bind mount on task ephemeral storage"
    # the Dockerfile's VOLUME makes ECS copy the directory (and its 65532 owner) into that mount
    assert f'VOLUME ["{STATE_DIR}"]' in (ROOT / "Dockerfile").read_text()


def test_dlq_cap_fits_ephemeral_storage() -> None:
    td = load("task-definition.json")
    storage = td["ephemeralStorage"]["sizeInGiB"] * 1024**3
    s = settings(container())
    # the image layers live on the same storage; keep 2 GiB for them and DLQ_MIN_FREE_BYTES
    assert 0 < s.dlq_max_size_bytes <= storage - 2 * 1024**3 - s.dlq_min_free_bytes


def test_memory_covers_the_configured_buffers() -> None:
    td = load("task-definition.json")
    s = settings(container())
    batches = (s.upload_queue_batches + s.upload_concurrency + 1) * s.batch_max_bytes * 2  # raw + compressed
    queue = s.channel_size * s.max_body_bytes * 2
    need = batches + queue + 256 * 1024**2
    assert need <= int(td["memory"]) * 1024**2, (need, td["memory"])
    assert int(td["cpu"]) >= 1024, "one process uses one core"


def test_efs_variant_differs_only_by_the_shared_dlq_volume_and_durable_acks() -> None:
    base, efs = load("task-definition.json"), load("task-definition-efs.json")
    cb, ce = container("task-definition.json"), container("task-definition-efs.json")
    extra_mounts = [m for m in ce["mountPoints"] if m not in cb["mountPoints"]]
    assert extra_mounts == [{"sourceVolume": "dlq", "containerPath": env(ce)["DLQ_DIR"], "readOnly": False}]
    # on EFS a task's loss keeps the spool: acknowledge durably (DESIGN.md §10)
    assert env(ce) == {**env(cb), "ACK_MODE": "durable"}
    same = ("mountPoints", "environment")
    assert {k: v for k, v in ce.items() if k not in same} == {k: v for k, v in cb.items() if k not in same}
    (vol,) = [v for v in efs["volumes"] if v["name"] == "dlq"]
    cfg = vol["efsVolumeConfiguration"]
    assert cfg["transitEncryption"] == "ENABLED"
    assert cfg["authorizationConfig"]["iam"] == "ENABLED" and cfg["authorizationConfig"]["accessPointId"]
    skip = ("family", "volumes", "containerDefinitions")  # containers compared above
    assert {k: v for k, v in efs.items() if k not in skip} == {k: v for k, v in base.items() if k not in skip}
    # the EFS task role policy grants exactly that file system through that access point
    (stmt,) = load("task-role-policy-efs.json")["Statement"]
    fs_arn = f"arn:aws:elasticfilesystem:ap-northeast-2:123456789012:file-system/{cfg['fileSystemId']}"
    assert stmt["Resource"] == [fs_arn]
    ap = stmt["Condition"]["StringEquals"]["elasticfilesystem:AccessPointArn"]
    assert ap.endswith("access-point/" + cfg["authorizationConfig"]["accessPointId"])


def _statements(name: str) -> list[dict]:
    doc = load(name)
    assert doc["Version"] == "2012-10-17"
    return doc["Statement"]


def _as_list(v: str | list[str]) -> list[str]:
    return [v] if isinstance(v, str) else v


@pytest.mark.parametrize("name", POLICIES)
def test_policies_are_least_privilege(name: str) -> None:
    for st in _statements(name):
        assert st["Effect"] == "Allow"
        assert "NotAction" not in st and "NotResource" not in st
        actions = _as_list(st["Action"])
        for action in actions:
            service, _, verb = action.partition(":")
            assert service and verb and "*" not in action, f"{name}: wildcard action {action!r}"
        for resource in _as_list(st["Resource"]):
            if resource == "*":
                assert set(actions) <= RESOURCE_STAR_ALLOWED, f"{name}: Resource * for {actions}"
            else:
                assert resource.startswith("arn:aws:"), resource
                assert ":*:" not in resource and "::*" not in resource, f"{name}: wildcard account/region {resource}"


def test_task_role_writes_only_the_raw_and_dlq_prefixes() -> None:
    s = settings(container())
    by_sid = {st["Sid"]: st for st in _statements("task-role-policy.json")}
    s3 = [st for st in by_sid.values() if any(a.startswith("s3:") for a in _as_list(st["Action"]))]
    assert len(s3) == 1
    assert _as_list(s3[0]["Action"]) == ["s3:PutObject"]
    assert sorted(_as_list(s3[0]["Resource"])) == sorted([
        f"arn:aws:s3:::{s.raw_bucket}/{s.raw_prefix}/*",
        f"arn:aws:s3:::{s.raw_bucket}/{s.dlq_prefix}/*",
    ])
    es = [st for st in by_sid.values() if any(a.startswith("es:") for a in _as_list(st["Action"]))]
    assert len(es) == 1
    assert set(_as_list(es[0]["Action"])) == {"es:ESHttpPost", "es:ESHttpGet"}
    (domain,) = _as_list(es[0]["Resource"])
    assert re.fullmatch(rf"arn:aws:es:{s.aws_region}:\d{{12}}:domain/[a-z][a-z0-9-]{{2,27}}/\*", domain), domain
    actions = {a for st in by_sid.values() for a in _as_list(st["Action"])}
    assert actions == {"s3:PutObject", "es:ESHttpPost", "es:ESHttpGet"}, "the server only writes"


def test_execution_role_reads_only_its_image_logs_and_secret() -> None:
    c = container()
    stmts = _statements("execution-role-policy.json")
    resources = {a: _as_list(st["Resource"]) for st in stmts for a in _as_list(st["Action"])}
    image_repo = c["image"].split("/", 1)[1].rsplit(":", 1)[0]
    assert resources["ecr:BatchGetImage"] == [f"arn:aws:ecr:ap-northeast-2:123456789012:repository/{image_repo}"]
    group = c["logConfiguration"]["options"]["awslogs-group"]
    assert resources["logs:PutLogEvents"] == [f"arn:aws:logs:ap-northeast-2:123456789012:log-group:{group}:*"]
    (secret,) = [s["valueFrom"] for s in c["secrets"] if s["name"] == "API_KEYS"]
    # Secrets Manager appends 6 random characters to a secret's ARN
    assert resources["secretsmanager:GetSecretValue"] == [secret + "-??????"]


def test_trust_policy_is_ecs_tasks_of_this_account() -> None:
    (st,) = _statements("trust-policy.json")
    assert st["Principal"] == {"Service": "ecs-tasks.amazonaws.com"} and st["Action"] == "sts:AssumeRole"
    assert st["Condition"]["StringEquals"]["aws:SourceAccount"] == "123456789012"


def test_roles_and_accounts_are_consistent() -> None:
    td = load("task-definition.json")
    assert td["taskRoleArn"].endswith(":role/estat-ingest-task")
    assert td["executionRoleArn"].endswith(":role/estat-ingest-execution")
    text = "".join((ECS / n).read_text() for n in REQUESTS | dict.fromkeys(POLICIES))
    assert set(re.findall(r"\b\d{12}\b", text)) == {"123456789012"}
    assert set(re.findall(r"\b[a-z]{2}-[a-z]+-\d\b", text)) == {"ap-northeast-2"}


def test_service_load_balancer_health_and_rollout() -> None:
    svc, tg, attrs = load("service.json"), load("target-group.json"), load("target-group-attributes.json")
    c = container()
    (lb,) = svc["loadBalancers"]
    assert lb["containerName"] == c["name"] and lb["containerPort"] == 8080
    assert lb["targetGroupArn"] == attrs["TargetGroupArn"]
    assert svc["deploymentConfiguration"]["minimumHealthyPercent"] == 100
    assert svc["deploymentConfiguration"]["deploymentCircuitBreaker"] == {"enable": True, "rollback": True}
    # /ready drops a draining instance and never depends on a sink; /health is for the container check
    assert tg["HealthCheckPath"] == "/ready" and tg["TargetType"] == "ip" and tg["Port"] == 8080
    delay = {a["Key"]: int(a["Value"]) for a in attrs["Attributes"]}["deregistration_delay.timeout_seconds"]
    # ECS waits for deregistration before SIGTERM; the drain budget starts after it
    assert 5 <= delay <= 60
    assert svc["desiredCount"] >= 2


def test_autoscaling_targets_the_service() -> None:
    svc, target, policy = load("service.json"), load("autoscaling-target.json"), load("autoscaling-policy.json")
    resource = f"service/{svc['cluster']}/{svc['serviceName']}"
    assert target["ResourceId"] == policy["ResourceId"] == resource
    assert target["ScalableDimension"] == policy["ScalableDimension"] == "ecs:service:DesiredCount"
    assert 2 <= target["MinCapacity"] <= svc["desiredCount"] <= target["MaxCapacity"]
    cfg = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert cfg["PredefinedMetricSpecification"]["PredefinedMetricType"] == "ECSServiceAverageCPUUtilization"
    assert 30 <= cfg["TargetValue"] <= 80
    assert cfg["ScaleInCooldown"] >= cfg["ScaleOutCooldown"], "scale in slowly: every removed task drains"


def test_readme_explains_the_dlq_storage_trade_off() -> None:
    text = (ECS / "README.md").read_text().lower()
    for phrase in ("ephemeral", "efs", "lost", "stoptimeout", "shutdown_timeout", "deregistration"):
        assert phrase in text, phrase


# ------------------------------------------------------------------------------------------------
# The ADOT variant: a collector sidecar scrapes /metrics into Amazon Managed Service for Prometheus

ADOT_CONFIG = ECS / "adot-collector-config.yaml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
AMP_ENDPOINT = re.compile(r"^https://aps-workspaces\.([a-z0-9-]+)\.amazonaws\.com/workspaces/(ws-[0-9a-f-]+)"
                          r"/api/v1/remote_write$")
SSM_STANDARD_MAX_BYTES = 4096  # a standard-tier SSM parameter (advanced: 8 KiB, billed)


def collector_config() -> dict:
    """adot-collector-config.yaml with its ${env:X} resolved from the collector's environment."""
    c = container("task-definition-adot.json", COLLECTOR)
    environment = env(c)
    text = ADOT_CONFIG.read_text()
    missing = sorted(set(ENV_REF.findall(text)) - set(environment))
    assert not missing, f"the collector config reads {missing}, which its container does not set"
    return yaml.safe_load(ENV_REF.sub(lambda m: environment[m.group(1)], text))


def test_adot_variant_differs_only_by_the_collector() -> None:
    base, adot = load("task-definition.json"), load("task-definition-adot.json")
    assert container("task-definition-adot.json") == container("task-definition.json")
    assert [c["name"] for c in adot["containerDefinitions"]] == [APP, COLLECTOR]
    skip = ("family", "containerDefinitions")
    assert {k: v for k, v in adot.items() if k not in skip} == {k: v for k, v in base.items() if k not in skip}
    assert adot["family"] == "estat-ingest-adot"


def test_collector_sidecar_cannot_take_the_server_down() -> None:
    td = load("task-definition-adot.json")
    c = container("task-definition-adot.json", COLLECTOR)
    # a crashed collector is a gap in the metrics, not an outage: the task keeps serving
    assert c["essential"] is False
    assert not c.get("portMappings"), "nothing connects to the collector from outside the task"
    assert "dependsOn" not in container("task-definition-adot.json"), "the server must not wait for it"
    image, _, tag = c["image"].rpartition(":")
    assert image == "public.ecr.aws/aws-observability/aws-otel-collector"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"pin a release, not {tag!r}"
    assert c["user"].split(":")[0] not in ("0", "root") and c["readonlyRootFilesystem"] is True
    assert c["healthCheck"]["command"] == ["CMD", "/healthcheck"]  # the image's own probe binary
    assert "health_check" in collector_config()["service"]["extensions"]
    log = c["logConfiguration"]
    assert log["logDriver"] == "awslogs" and log["options"]["mode"] == "non-blocking"
    app_log = container()["logConfiguration"]["options"]
    assert log["options"]["awslogs-group"] == app_log["awslogs-group"]
    assert log["options"]["awslogs-stream-prefix"] != app_log["awslogs-stream-prefix"]
    # the server's memory budget (test_memory_covers_the_configured_buffers) still fits beside it
    s = settings(container("task-definition-adot.json"))
    need = (s.upload_queue_batches + s.upload_concurrency + 1) * s.batch_max_bytes * 2 \
        + s.channel_size * s.max_body_bytes * 2 + 256 * 1024**2
    assert need + c["memory"] * 1024**2 <= int(td["memory"]) * 1024**2
    assert c["memoryReservation"] <= c["memory"] and c["cpu"] <= int(td["cpu"]) // 4


def test_collector_scrapes_the_servers_metrics_as_the_alerts_expect() -> None:
    cfg = collector_config()
    prom = cfg["receivers"]["prometheus"]["config"]
    (job,) = prom["scrape_configs"]
    # the alert rules select the scrape job by name
    (expected_job,) = set(re.findall(r'up\{job="([^"]+)"\}', ALERTS.read_text()))
    assert job["job_name"] == expected_job
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, _, port = target.rpartition(":")
    assert host in ("127.0.0.1", "localhost"), "awsvpc: the sidecar reaches the server on the task's loopback"
    assert int(port) == settings(container("task-definition-adot.json")).http_port
    interval, timeout = (int(prom["global"][k].removesuffix("s")) for k in ("scrape_interval", "scrape_timeout"))
    assert 0 < timeout < interval <= 60


def test_collector_writes_to_one_amp_workspace_with_sigv4() -> None:
    cfg = collector_config()
    (pipeline,) = cfg["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["prometheus"] and pipeline["exporters"] == ["prometheusremotewrite"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline.get(kind, [])) <= set(cfg[kind]), f"{kind} used but not configured"
    assert set(cfg["service"]["extensions"]) <= set(cfg["extensions"])
    exporter = cfg["exporters"]["prometheusremotewrite"]
    assert exporter["auth"]["authenticator"] == "sigv4auth"
    assert "sigv4auth" in cfg["service"]["extensions"]
    sigv4 = cfg["extensions"]["sigv4auth"]
    region = settings(container("task-definition-adot.json")).aws_region
    assert sigv4 == {"region": region, "service": "aps"}
    m = AMP_ENDPOINT.match(exporter["endpoint"])
    assert m, exporter["endpoint"]
    assert m.group(1) == region
    # the task role may write to exactly that workspace, and do nothing else there
    (stmt,) = load("task-role-policy-adot.json")["Statement"]
    assert stmt["Action"] == ["aps:RemoteWrite"]
    assert stmt["Resource"] == [f"arn:aws:aps:{region}:123456789012:workspace/{m.group(2)}"]
    assert load("task-definition-adot.json")["taskRoleArn"].endswith(":role/estat-ingest-task")


def test_every_task_writes_its_own_series() -> None:
    """Every sidecar scrapes 127.0.0.1:8080: without a per-task `instance`, the tasks' series
    would be one series in the workspace, written by several tasks at once."""
    cfg = collector_config()
    (pipeline,) = cfg["service"]["pipelines"].values()
    procs = pipeline["processors"]
    assert "ecs" in cfg["processors"]["resourcedetection"]["detectors"]
    (action,) = [a for a in cfg["processors"]["resource"]["attributes"] if a["key"] == "service.instance.id"]
    assert action["action"] == "upsert" and action["from_attribute"].startswith("aws.ecs.task.")
    assert procs.index("resourcedetection") < procs.index("resource"), "detect first, then copy"
    assert cfg["exporters"]["prometheusremotewrite"]["resource_to_telemetry_conversion"] == {"enabled": False}


def test_collector_config_reaches_the_collector_through_ssm() -> None:
    c = container("task-definition-adot.json", COLLECTOR)
    (secret,) = [s for s in c["secrets"] if s["name"] == "AOT_CONFIG_CONTENT"]
    param = secret["valueFrom"]
    assert re.fullmatch(r"arn:aws:ssm:ap-northeast-2:123456789012:parameter/[\w/.-]+", param), param
    (stmt,) = load("execution-role-policy-adot.json")["Statement"]
    assert stmt["Action"] == ["ssm:GetParameters"] and stmt["Resource"] == [param]
    name = "/" + param.split(":parameter/", 1)[1]
    for doc in (ADOT_CONFIG.read_text(), (ECS / "README.md").read_text()):
        assert f"--name {name}" in doc, "the put-parameter command must name the parameter the task reads"
    assert len(ADOT_CONFIG.read_bytes()) <= SSM_STANDARD_MAX_BYTES


def test_only_collect_reaches_the_tasks_through_the_load_balancer() -> None:
    """/metrics (and /health, /ready) must not be public. The listener allows /collect instead of
    denying /metrics (a deny rule holds only while the ALB and the server read a path alike; the
    fronts used to decode `/%6Detrics` into /metrics): everything else gets the listener's fixed 404."""
    rule, default = load("listener-rule-collect.json"), load("listener-default-action.json")
    assert rule["ListenerArn"] == default["ListenerArn"]
    (cond,) = rule["Conditions"]
    assert cond["Field"] == "path-pattern" and cond["PathPatternConfig"]["Values"] == ["/collect"]
    (action,) = rule["Actions"]
    assert action["Type"] == "forward"
    assert action["TargetGroupArn"] == load("target-group-attributes.json")["TargetGroupArn"]
    (fallback,) = default["DefaultActions"]
    assert fallback["Type"] == "fixed-response" and fallback["FixedResponseConfig"]["StatusCode"] == "404"
    # the health check goes to the targets directly, not through the listener's rules
    assert load("target-group.json")["HealthCheckPath"] == "/ready"


def test_readme_explains_adot_and_the_private_routes() -> None:
    text = (ECS / "README.md").read_text()
    for phrase in ("task-definition-adot.json", "adot-collector-config.yaml", "aps:RemoteWrite",
                   "ssm:GetParameters", "AOT_CONFIG_CONTENT", "listener-rule-collect.json", "/metrics"):
        assert phrase in text, phrase
