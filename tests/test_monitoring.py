"""deploy/'s alerts and dashboard against a real Prometheus scraping a live server.

Prometheus (the Debian package ``prometheus``; ``make test`` installs it where
it is missing and apt-get is usable as root) scrapes a Lockgate server that
serves a healthy model (``simple``) and a broken one (``broken``) every
second, with the alert rules loaded and evaluated every second. Every alert
rule and every dashboard query is then evaluated through Prometheus' HTTP
API on loopback and its values are checked: first after successful traffic
only (the case where a failure counter without samples left the dashboard
empty), then after some failures.

The rules run with ``for: 0s``: their durations are covered by promtool's
rule unit tests in test_deploy.py; here the expressions and templates meet
real series. Skipped where the ``prometheus`` binary is absent.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from support import ServerProcess, free_port, launch_server, simple_inputs
from test_deploy import DEPLOY, dashboard
from tritonclient.utils import InferenceServerException

from lockgate.errors import FAILURE_REASONS
from models.build import build_broken, build_simple

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package: prometheus)"
)

#: Target labels a Kubernetes ServiceMonitor would add; alerts and panels use them.
TARGET_LABELS = {"namespace": "ml", "pod": "lockgate-0"}
#: Long enough to hold every sample of the test, so rates are never empty.
RATE_WINDOW = "5m"
WAIT_S = 60.0

Sample = tuple[dict[str, str], float]


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[Sample]:
        data = self.get("/api/v1/query", query=promql)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Poll until ``check()`` holds: scrapes and evaluations come every second."""
        deadline = time.monotonic() + WAIT_S
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus never showed {what}")
            time.sleep(0.25)

    def firing(self) -> dict[str, list[dict[str, Any]]]:
        alerts: dict[str, list[dict[str, Any]]] = {}
        for alert in self.get("/api/v1/alerts")["alerts"]:
            if alert["state"] == "firing":
                alerts.setdefault(alert["labels"]["alertname"], []).append(alert)
        return alerts


@pytest.fixture(scope="module")
def lockgate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("monitoring-repository")
    build_simple(repo)
    build_broken(repo)
    server = launch_server(repo, tmp_path_factory.mktemp("monitoring-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(
    lockgate: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    assert PROMETHEUS is not None
    workdir = tmp_path_factory.mktemp("prometheus")
    spec = yaml.safe_load((DEPLOY / "prometheus" / "lockgate-alerts.yaml").read_text())["spec"]
    for group in spec["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["for"] = "0s"
    (workdir / "rules.yaml").write_text(yaml.safe_dump(spec))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {
                "job_name": "lockgate",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{lockgate.metrics_port}"], "labels": TARGET_LABELS}
                ],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", process)
    try:
        prom.wait_for("itself ready", lambda: _ready(prom))
        # Traffic must start after the first scrape, or rate() has nothing to compare.
        prom.wait_for("the server scraped", lambda: prom.query('up{job="lockgate"} == 1') != [])
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _ready(prom: Prometheus) -> bool:
    if prom.process.poll() is not None:
        raise AssertionError(f"prometheus exited with {prom.process.returncode}")
    try:
        with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def scraped(prom: Prometheus, metric: str, value: float) -> Callable[[], bool]:
    return lambda: [v for _, v in prom.query(f'{metric}{{model="simple"}}')] == [value]


# --- the dashboard's queries and what each must show ----------------------------------

Check = Callable[[list[Sample]], None]


def one(expected: Callable[[float], bool], **labels: str) -> Check:
    """Exactly one sample, with ``labels`` among its labels, whose value passes."""

    def check(result: list[Sample]) -> None:
        assert len(result) == 1, result
        got, value = result[0]
        assert labels.items() <= got.items(), result
        assert expected(value), result

    return check


def per(label: str, expected: Mapping[str, Callable[[float], bool]]) -> Check:
    """One sample per value of ``label``, each passing its own check."""

    def check(result: list[Sample]) -> None:
        assert sorted(got[label] for got, _ in result) == sorted(expected), result
        for got, value in result:
            assert expected[got[label]](value), result

    return check


def gpu(result: list[Sample]) -> None:
    # A machine without NVIDIA GPUs exports no nv_gpu_* series (test_metrics checks it).
    assert all(value >= 0 for _, value in result), result


def zero(v: float) -> bool:
    return v == 0


def positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def at_least_one(v: float) -> bool:
    return math.isfinite(v) and v >= 1


def finite(v: float) -> bool:
    return math.isfinite(v) and v >= 0


def latency(result: list[Sample]) -> None:
    one(finite, model="simple")(result)


def expectations(failing: bool) -> dict[str, list[Check]]:
    """Panel title -> a check per target, in order. ``failing``: after bad requests."""
    ratio = positive if failing else zero
    reasons = {
        r: (positive if failing and r == "INVALID_ARGUMENT" else zero) for r in FAILURE_REASONS
    }
    return {
        "Request rate": [one(positive)],
        "Failure ratio": [one(ratio)],
        "Model versions ready": [one(lambda v: v == 1), one(lambda v: v == 1)],
        "Pending requests": [one(zero)],
        "Request rate by model": [
            one(positive, model="simple"),
            one(ratio, model="simple"),
            one(positive, model="simple"),
        ],
        "Failure ratio by reason": [per("reason", reasons)],
        "Request latency (p50 / p95 / p99)": [latency] * 3,
        "Queue time (p50 / p95 / p99)": [latency] * 3,
        "Compute time (p50 / p95 / p99)": [latency] * 3,
        "Average time per request by phase": [latency] * 4,
        "Batch size": [
            one(at_least_one, model="simple"),
            # histogram_quantile interpolates inside the first bucket, (0, 1].
            one(positive, model="simple"),
            one(at_least_one, model="simple"),
        ],
        "Pending requests by pod": [one(zero, model="simple", pod="lockgate-0")],
        "Model ready": [per("model", {"simple": lambda v: v == 1, "broken": zero})],
        "Model load duration": [one(positive, model="simple", version="1")],
        "GPU utilization": [gpu],
        "GPU memory used": [gpu],
        "GPU power": [gpu],
    }


def panels() -> Iterator[tuple[str, list[str]]]:
    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from walk(item.get("panels", []))

    for panel in walk(dashboard()["panels"]):
        targets = panel.get("targets", [])
        if targets:
            yield panel["title"], [grafana(t["expr"]) for t in targets]


def grafana(expr: str) -> str:
    """What Grafana sends with every namespace and model selected."""
    return (
        expr.replace("$__rate_interval", RATE_WINDOW)
        .replace('=~"$namespace"', '=~".*"')
        .replace('=~"$model"', '=~".*"')
    )


def check_dashboard(prom: Prometheus, failing: bool) -> None:
    expected = expectations(failing)
    seen = set()
    for title, queries in panels():
        assert title in expected, f"panel {title!r}: add what it must show to this test"
        assert len(queries) == len(expected[title]), f"panel {title!r}: targets changed"
        for query, check in zip(queries, expected[title], strict=True):
            try:
                check(prom.query(query))
            except AssertionError as exc:
                raise AssertionError(f"panel {title!r}: {query}\n{exc}") from None
        seen.add(title)
    assert seen == set(expected)


def check_variables(prom: Prometheus) -> None:
    """The Namespace and Model variables list what is scraped, the broken model too."""
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        selector, label = var["query"]["query"][len("label_values(") : -1].rsplit(",", 1)
        match = selector.replace('=~"$namespace"', '=~".*"')
        values = prom.get(f"/api/v1/label/{label.strip()}/values", **{"match[]": match})
        want = {"namespace": ["ml"], "model": ["broken", "simple"]}[var["name"]]
        assert values == want, (var["name"], values)


# --- the test ----------------------------------------------------------------------------


def test_alerts_and_dashboard_with_real_prometheus(
    lockgate: ServerProcess, prometheus: Prometheus
) -> None:
    prom = prometheus
    rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
    names = {
        r["alert"]
        for g in yaml.safe_load((DEPLOY / "prometheus" / "lockgate-alerts.yaml").read_text())[
            "spec"
        ]["groups"]
        for r in g["rules"]
    }
    assert {r["name"] for r in rules} == names, "Prometheus did not load every rule"

    # Healthy traffic only: no failure has happened yet.
    successes = 20
    with grpcclient.InferenceServerClient(lockgate.url) as client:
        for _ in range(successes):
            client.infer("simple", simple_inputs())
        prom.wait_for("the successes", scraped(prom, "nv_inference_request_success", successes))
        # (LockgateNoTraffic fires for `simple` before its first request: wait it out.)
        prom.wait_for(
            "the not-ready alert alone", lambda: set(prom.firing()) == {"LockgateModelNotReady"}
        )
        check_dashboard(prom, failing=False)
        check_variables(prom)
        firing = prom.firing()
        (alert,) = firing["LockgateModelNotReady"]
        assert alert["labels"]["model"] == "broken"
        assert alert["labels"]["version"] == "1"
        assert alert["labels"]["state"] == "UNAVAILABLE"
        assert alert["annotations"]["summary"] == (
            "Lockgate model broken v1 not ready on lockgate-0"
        )

        # Then 5 bad requests in 25: a 20% failure ratio.
        bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        bad.set_data_from_numpy(np.ones((1, 16), np.float32))
        for _ in range(5):
            with pytest.raises(InferenceServerException, match="INT32"):
                client.infer("simple", [bad, simple_inputs()[1]])
    prom.wait_for(
        "the failures",
        lambda: prom.query('sum(nv_inference_request_failure{model="simple"})')[0][1] == 5,
    )
    both = {"LockgateModelNotReady", "LockgateHighFailureRatio"}
    prom.wait_for("the failure alert", lambda: set(prom.firing()) == both)
    check_dashboard(prom, failing=True)
    firing = prom.firing()
    (alert,) = firing["LockgateHighFailureRatio"]
    assert alert["labels"]["model"] == "simple"
    assert alert["annotations"]["description"].startswith("20% of inference requests for simple")

    # Every rule evaluated without error against the real series.
    rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
    for rule in rules:
        assert rule["health"] == "ok", rule
