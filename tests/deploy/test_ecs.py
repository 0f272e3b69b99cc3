"""deploy/ecs/: task definitions, service, autoscaling and IAM policies.

Every AWS request file is validated against botocore's own service model (the same check the
AWS CLI does before sending), then the values are checked against the contract: shutdown timing,
health check, logs, storage, least privilege.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from estat_ingest.config import Settings

ROOT = Path(__file__).resolve().parents[2]
ECS = ROOT / "deploy" / "ecs"
TASK_DEFS = ["task-definition.json", "task-definition-efs.json"]
STATE_DIR = "/var/lib/estat-ingest"
FARGATE_MAX_STOP_TIMEOUT = 120

# file -> (botocore service, operation whose input it is)
REQUESTS = {
    "task-definition.json": ("ecs", "RegisterTaskDefinition"),
    "task-definition-efs.json": ("ecs", "RegisterTaskDefinition"),
    "service.json": ("ecs", "CreateService"),
    "autoscaling-target.json": ("application-autoscaling", "RegisterScalableTarget"),
    "autoscaling-policy.json": ("application-autoscaling", "PutScalingPolicy"),
    "target-group.json": ("elbv2", "CreateTargetGroup"),
    "target-group-attributes.json": ("elbv2", "ModifyTargetGroupAttributes"),
}
POLICIES = ["task-role-policy.json", "task-role-policy-efs.json", "execution-role-policy.json"]
# the only actions AWS does not let you scope to a resource
RESOURCE_STAR_ALLOWED = {"ecr:GetAuthorizationToken"}


def load(name: str) -> dict:
    return json.loads((ECS / name).read_text())


def container(name: str = "task-definition.json") -> dict:
    (c,) = load(name)["containerDefinitions"]
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


def test_efs_variant_differs_only_by_the_shared_dlq_volume() -> None:
    base, efs = load("task-definition.json"), load("task-definition-efs.json")
    cb, ce = container("task-definition.json"), container("task-definition-efs.json")
    extra_mounts = [m for m in ce["mountPoints"] if m not in cb["mountPoints"]]
    assert extra_mounts == [{"sourceVolume": "dlq", "containerPath": env(ce)["DLQ_DIR"], "readOnly": False}]
    assert {k: v for k, v in ce.items() if k != "mountPoints"} == {k: v for k, v in cb.items() if k != "mountPoints"}
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
