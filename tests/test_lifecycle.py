"""Server lifecycle: drain on SIGTERM, replicas, hot reload, unload, readiness, connection age.

Every test runs private servers (subprocesses, as a user starts them) over a
repository built into its own ``tmp_path``. Nothing is asserted on timing but
the generous bounds on how long a drain may take; waits poll the server and
fail only after ``PATIENCE_S``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerProcess, client_ports, wait_ready
from tritonclient.utils import InferenceServerException

from lockgate_client import (
    Client,
    LockgateError,
    RetryPolicy,
    UnavailableError,
)
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc
from models.build import build_broken, build_simple, build_slow, build_versions

#: Every test here runs against a single-process server and one with two front ends.
pytestmark = pytest.mark.frontends(1, 2)

StartServer = Callable[..., ServerProcess]

#: Bound on every wait for the server; reaching it is a failure, never a pass.
PATIENCE_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WIDTH = 256
#: MatMuls in the slow model's chain: about 100 ms a request on the reference machine.
SLOW_100MS = 360
#: Concurrent clients in the drain tests, each with one request queued.
CLIENTS = 16
#: What unloading a model version logs (model, version), one line per version.
UNLOAD_LINE = r"unloaded model {} version {}: requests in flight drained in \d+\.\d\d s"

Outcome = BaseException | None  # None: succeeded with the right output


# --- probes, as a kubelet or a load balancer sees them ------------------------------------


def health(url: str, service: str = "") -> int:
    """One grpc.health.v1 Check on a fresh channel."""
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return int(stub.Check(request, timeout=5).status)


def server_ready(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready)


def model_ready(url: str, model: str, version: str = "") -> bool:
    with Client(url, timeout=5) as client:
        return client.is_ready(model, version=version)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {PATIENCE_S} s for {what}")
        time.sleep(0.05)


def exit_code(server: ServerProcess, timeout: float) -> int:
    """Wait for the process to exit by itself; fail with its log if it does not."""
    try:
        return server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{server.log()}") from None


def pending(server: ServerProcess, model: str) -> int:
    """Requests queued for an instance (the Prometheus gauge), 0 when not listed."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_pending_request_count{") and f'model="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def successes(url: str, model: str) -> int:
    with Client(url, timeout=5) as client:
        return sum(s.inference_stats.success.count for s in client.statistics(model))


def row(seed: int) -> npt.NDArray[np.float32]:
    return np.full((1, WIDTH), seed, dtype=np.float32)


def infer_slow(client: Client, seed: int, model: str = "slow") -> Outcome:
    """One request to a ``slow`` model (OUTPUT0 = INPUT0): its outcome, never raising."""
    try:
        out = client.infer(model, {"INPUT0": row(seed)})
        np.testing.assert_array_equal(out["OUTPUT0"], row(seed))
    except (LockgateError, AssertionError) as exc:
        return exc
    return None


class QueuedClients:
    """``count`` clients, each with its own connection and one request in the queue."""

    def __init__(self, server: ServerProcess, count: int = CLIENTS, model: str = "slow") -> None:
        self.server = server
        self.model = model
        self.count = count
        self.outcomes: dict[int, Outcome] = {}
        self._base = successes(server.url, model)
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, index: int) -> None:
        with Client(self.server.url, timeout=60) as client:
            self.outcomes[index] = infer_slow(client, index, self.model)

    def accepted(self) -> int:
        """Requests the server has taken: answered, queued, and the one running."""
        done = successes(self.server.url, self.model) - self._base  # read first: never overcounts
        queued = pending(self.server, self.model)
        return done + queued + (1 if queued else 0)

    def wait_accepted(self) -> None:
        wait_for(lambda: self.accepted() >= self.count, f"{self.count} requests accepted")

    def join(self) -> list[Outcome]:
        for thread in self._threads:
            thread.join(PATIENCE_S + 60)
            assert not thread.is_alive(), "a client hung"
        return [self.outcomes[i] for i in range(self.count)]


@pytest.fixture
def slow_repository(tmp_path: Path) -> Path:
    """``slow`` without batching: 16 queued requests take 16 runs, about 1.6 s."""
    repo = tmp_path / "repo"
    build_slow(repo, iterations=SLOW_100MS, dynamic_batching=None)
    return repo


# --- 1. graceful drain ------------------------------------------------------------------


def test_sigterm_finishes_accepted_requests_and_refuses_new_ones(
    start_server: StartServer, slow_repository: Path
) -> None:
    drain_s = 30.0
    srv = start_server(slow_repository, "--drain-seconds", str(drain_s))
    clients = QueuedClients(srv)
    clients.wait_accepted()

    srv.signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: health(srv.url) == NOT_SERVING, "readiness to turn NOT_SERVING")
    # Probed on fresh connections while the queue drains: not ready, still live.
    assert health(srv.url, "liveness") == SERVING
    assert health(srv.url, "slow") == NOT_SERVING
    assert not server_ready(srv.url)
    with Client(srv.url, timeout=10) as late:
        assert late.is_live()
        refused = [infer_slow(late, 100 + i) for i in range(CLIENTS)]
    assert len(clients.outcomes) < CLIENTS, "the queue drained before the probes: make it longer"

    assert clients.join() == [None] * CLIENTS, "a request accepted before the signal failed"
    assert exit_code(srv, drain_s + 10) == 0
    assert time.monotonic() - signalled < drain_s
    # Sent after the signal: refused while draining, then nothing listens.
    assert all(isinstance(e, UnavailableError) for e in refused), refused
    assert all("shutting down" in str(e) for e in refused), refused
    with Client(srv.url, timeout=10) as gone:
        assert isinstance(infer_slow(gone, 0), UnavailableError)
    log = srv.log()
    assert "SIGTERM: draining" in log
    assert "drained and stopped" in log


def test_second_signal_exits_at_once(start_server: StartServer, slow_repository: Path) -> None:
    srv = start_server(slow_repository, "--drain-seconds", "30")
    clients = QueuedClients(srv)
    clients.wait_accepted()
    srv.signal(signal.SIGTERM)
    wait_for(lambda: health(srv.url) == NOT_SERVING, "the drain to start")
    srv.signal(signal.SIGTERM)
    # os._exit(1): no cleanup, the queue is abandoned.
    assert exit_code(srv, 10) == 1
    lost = [e for e in clients.join() if e is not None]
    assert lost, "every queued request completed: the second signal did not cut the drain"
    assert all(isinstance(e, UnavailableError) for e in lost), lost
    assert "second SIGTERM: exiting now" in srv.log()


def test_drain_time_bounds_the_exit(start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # About 250 ms a request: 16 queued ones need about 4 s, four times the drain time.
    build_slow(repo, iterations=SLOW_100MS * 5 // 2, dynamic_batching=None)
    drain_s = 1.0
    srv = start_server(repo, "--drain-seconds", str(drain_s))
    clients = QueuedClients(srv)
    clients.wait_accepted()
    srv.signal(signal.SIGTERM)
    # Requests still queued at the deadline are cancelled; the exit is still clean.
    code = exit_code(srv, drain_s + 10)
    assert code == 0, srv.log()
    # What the requests cut short get is not specified; they must not hang.
    clients.join()
    log = srv.log()
    assert "drain time is up" in log
    # Logged (and counted) as the server's doing: no caller cancelled anything.
    cut = "failed: UNAVAILABLE: the server's drain time ran out before the request completed"
    assert cut in log, log
    assert "the caller cancelled" not in log, log


def test_sigterm_while_models_load_stops_cleanly(start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # 1000 warmup runs of about 100 ms: loading would take minutes.
    build_slow(repo, iterations=SLOW_100MS, dynamic_batching=None, config_extra=warmup(WIDTH, 1000))
    srv = start_server(repo, "--drain-seconds", "30", wait=False)
    # The port opens before models load: live, not ready.
    wait_for(lambda: _probe(srv.url, "liveness") == SERVING, "the server to listen")
    assert health(srv.url) == NOT_SERVING
    time.sleep(1.0)  # well into the warmup
    srv.signal(signal.SIGTERM)
    signalled = time.monotonic()
    # Kubernetes scaling a pod down during its startup: a clean exit, without
    # finishing the load first (the default handler's exit status would be -15).
    assert exit_code(srv, 15) == 0
    assert time.monotonic() - signalled < 15
    log = srv.log()
    assert "SIGTERM during startup" in log
    assert "loading model 'slow' was abandoned: the server is stopping" in log
    assert "stopped during startup" in log
    assert "loaded model slow" not in log
    assert "failed to load" not in log  # stopping is not a load failure


# --- 2. scale-out: three replicas, one drained ------------------------------------------


def test_draining_a_replica_fails_no_request(start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    build_slow(repo, iterations=SLOW_100MS // 10)  # about 10 ms a batch
    replicas = [start_server(repo, wait=False) for _ in range(3)]
    for replica in replicas:
        wait_ready(replica.url, replica.process)
    policy = RetryPolicy(max_retries=20, initial_backoff=0.01, max_backoff=0.2, infer=True)
    stop = threading.Event()
    answered = [0]
    failures: list[Outcome] = []
    lock = threading.Lock()

    def drive(client: Client, seed: int) -> None:
        while not stop.is_set():
            outcome = infer_slow(client, seed)
            with lock:
                if outcome is None:
                    answered[0] += 1
                else:
                    failures.append(outcome)

    with Client([r.url for r in replicas], timeout=30, retries=policy) as client:
        threads = [threading.Thread(target=drive, args=(client, i)) for i in range(6)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: all(successes(r.url, "slow") for r in replicas), "traffic on all 3")
            before = [successes(r.url, "slow") for r in replicas]
            replicas[0].signal(signal.SIGTERM)
            assert exit_code(replicas[0], PATIENCE_S) == 0
            target = answered[0] + 60
            wait_for(lambda: answered[0] >= target, "traffic after the drain")
        finally:
            stop.set()
            for thread in threads:
                thread.join(PATIENCE_S)
    # The drained replica cut nothing short: its accepted requests all completed.
    assert "drain time is up" not in replicas[0].log()
    # The SDK watches each replica's grpc.health.v1 status (healthCheckConfig),
    # so the drained one left the rotation when it reported NOT_SERVING; the
    # retry policy covers calls that were already on their way to it.
    assert failures == [], failures
    assert all(n > 0 for n in before), before
    # The two left took over the traffic.
    after = [successes(r.url, "slow") for r in replicas[1:]]
    assert all(a > b for a, b in zip(after, before[1:], strict=True)), (before, after)


# --- 3. hot reload (--model-control-mode poll) --------------------------------------------


def poll_server(start_server: StartServer, repo: Path) -> ServerProcess:
    return start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.5")


def test_new_version_takes_over_without_failures(start_server: StartServer, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    build_versions(staging)  # versioned 1-3: OUTPUT0 = INPUT0 + version
    built = staging / "versioned"
    model = tmp_path / "repo" / "versioned"
    model.mkdir(parents=True)
    shutil.copy(built / "config.pbtxt", model)
    os.rename(built / "1", model / "1")
    srv = poll_server(start_server, model.parent)

    stop = threading.Event()
    #: Per client, (version, what OUTPUT0 - INPUT0 was) of every response, in order.
    seen: list[list[tuple[str, int]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def drive(index: int) -> None:
        data = np.arange(4, dtype=np.int32).reshape(1, 4) + index
        client = tc.InferenceServerClient(srv.url)
        tensor = tc.InferInput("INPUT0", [1, 4], "INT32")
        tensor.set_data_from_numpy(data)
        try:
            while not stop.is_set():
                result = client.infer("versioned", [tensor])
                added = result.as_numpy("OUTPUT0") - data
                assert (added == added.flat[0]).all(), added
                seen[index].append((result.get_response().model_version, int(added.flat[0])))
        except (InferenceServerException, AssertionError) as exc:
            errors.append(exc)
        finally:
            client.close()

    def serving(state: tuple[str, int]) -> Callable[[], bool]:
        return lambda: all(s and s[-1] == state for s in seen) or bool(errors)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(seen))]
    for thread in threads:
        thread.start()
    try:
        wait_for(serving(("1", 1)), "version 1")
        # New version: a fully written directory appears at once, no poll sees half of it.
        os.rename(built / "2", model / "2")
        wait_for(serving(("2", 2)), "version 2 to take over")
        # Changed version: a new file (version 3's graph) renamed over 2/model.onnx.
        shutil.copyfile(built / "3" / "model.onnx", staging / "next.onnx")
        os.replace(staging / "next.onnx", model / "2" / "model.onnx")
        wait_for(serving(("2", 3)), "the changed file to take over")
        counts = [len(s) for s in seen]
        wait_for(lambda: all(len(s) > n + 10 for s, n in zip(seen, counts, strict=True)), "more")
    finally:
        stop.set()
        for thread in threads:
            thread.join(PATIENCE_S)
    assert errors == []
    stages = [("1", 1), ("2", 2), ("2", 3)]
    for states in seen:
        # Each client moves forward only: never back to what was replaced.
        order = [stages.index(state) for state in states]
        assert order == sorted(order), states
    assert not model_ready(srv.url, "versioned", "1")  # latest policy: 1 retired
    assert model_ready(srv.url, "versioned", "2")
    assert health(srv.url) == SERVING
    assert "failed to" not in srv.log()  # no load or reload failed on the way


def test_removed_model_drains_then_is_unavailable(
    start_server: StartServer, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    build_slow(repo, iterations=SLOW_100MS)  # dynamic batching: about 100 ms a batch
    build_simple(repo)
    srv = poll_server(start_server, repo)
    results: list[list[Outcome]] = [[] for _ in range(8)]

    def drive(index: int) -> None:
        # Until refused: whatever was in flight when the model left must complete.
        with Client(srv.url, timeout=60) as client:
            while not results[index] or results[index][-1] is None:
                results[index].append(infer_slow(client, index))

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(len(r) >= 2 for r in results), "traffic on slow")
    os.rename(repo / "slow", tmp_path / "slow-removed")  # the whole model at once
    for thread in threads:
        thread.join(PATIENCE_S)
        assert not thread.is_alive(), "a client was never refused"
    for outcomes in results:
        *answered, refusal = outcomes
        assert answered and all(o is None for o in answered), outcomes
        # Refused at the door (no ready version / unknown), never cut off in the queue.
        assert isinstance(refusal, LockgateError), refusal
        assert refusal.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
        assert "unloaded before the request ran" not in refusal.message
    wait_for(lambda: health(srv.url, "slow") == NOT_SERVING, "slow to report NOT_SERVING")
    assert not model_ready(srv.url, "slow")
    # The rest of the repository serves on; a removed model is not owed to readiness.
    assert health(srv.url) == SERVING
    with Client(srv.url, timeout=10) as client:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        out = client.infer("simple", {"INPUT0": a, "INPUT1": a})
        np.testing.assert_array_equal(out["OUTPUT0"], 2 * a)
        index = {(m.name, m.version): m for m in client.models()}
    assert index["slow", "1"].state == "UNAVAILABLE"
    unloads = [line for line in srv.log().splitlines() if "unloaded model" in line]
    assert len(unloads) == 1, unloads
    assert re.search(UNLOAD_LINE.format("slow", 1) + "$", unloads[0]), unloads


def test_drain_stops_polling_the_repository(start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # About 300 ms a request: the 16 queued ones take about 5 s to drain.
    build_slow(repo, iterations=SLOW_100MS * 3, dynamic_batching=None)
    staging = tmp_path / "staging"
    build_simple(staging)
    srv = poll_server(start_server, repo)
    clients = QueuedClients(srv)
    clients.wait_accepted()
    srv.signal(signal.SIGTERM)
    wait_for(lambda: health(srv.url) == NOT_SERVING, "the drain to start")
    os.rename(staging / "simple", repo / "simple")
    time.sleep(1.5)  # three poll intervals
    assert len(clients.outcomes) < CLIENTS, "the queue drained before the polls: make it longer"
    assert clients.join() == [None] * CLIENTS
    assert exit_code(srv, PATIENCE_S) == 0
    log = srv.log()
    assert "drained and stopped" in log
    # A draining server neither noticed the new model nor loaded it.
    assert "model simple new or changed" not in log, log
    assert "loaded model simple" not in log, log


def test_unload_logs_one_line_per_version(start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    build_slow(repo, iterations=SLOW_100MS, dynamic_batching=None)
    config = build_versions(repo) / "config.pbtxt"
    config.write_text(config.read_text() + "\nversion_policy: { all { } }\n")
    srv = start_server(
        repo, "--model-control-mode", "explicit", "--load-model", "*", "--log-format", "json"
    )
    clients = QueuedClients(srv, count=8)
    clients.wait_accepted()
    with Client(srv.url, timeout=PATIENCE_S) as client:
        started = time.monotonic()
        client.unload("slow")
        unload_s = time.monotonic() - started
        client.unload("versioned")
    # The unload waited for the queue: every accepted request completed.
    assert clients.join() == [None] * 8
    events = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    unloads = [e for e in events if e["message"].startswith("unloaded model")]
    # Exactly one line per version, each with the model, version and drain time.
    assert sorted((e.get("event"), e.get("model"), e.get("version")) for e in unloads) == [
        ("model_unloaded", "slow", "1"),
        ("model_unloaded", "versioned", "1"),
        ("model_unloaded", "versioned", "2"),
        ("model_unloaded", "versioned", "3"),
    ], unloads
    for event in unloads:
        line = UNLOAD_LINE.format(event["model"], event["version"])
        assert re.fullmatch(line, event["message"]), event
    (slow,) = (e for e in unloads if e["model"] == "slow")
    # It drained the requests still queued, within the RPC that asked for it.
    assert 0 < slow["drain_seconds"] <= unload_s, (slow, unload_s)


# --- 4. readiness and warmup --------------------------------------------------------------


@pytest.fixture
def mixed_repository(tmp_path: Path) -> Path:
    repo = tmp_path / "mixed"
    build_simple(repo)
    build_broken(repo)
    return repo


def test_strict_readiness_with_a_broken_model(
    start_server: StartServer, mixed_repository: Path
) -> None:
    strict = start_server(mixed_repository, "--strict-readiness", wait=False)
    lenient = start_server(mixed_repository, "--no-strict-readiness", wait=False)
    # Per-model health is published once loading is over.
    wait_for(lambda: _probe(strict.url, "simple") == SERVING, "the strict server to load")
    assert health(strict.url) == NOT_SERVING
    assert not server_ready(strict.url)
    assert health(strict.url, "liveness") == SERVING
    assert health(strict.url, "broken") == NOT_SERVING
    with Client(strict.url, timeout=10) as client:
        assert client.is_live()
        a = np.ones((1, 16), dtype=np.int32)
        assert client.infer("simple", {"INPUT0": a, "INPUT1": a})["OUTPUT0"].tolist() == [[2] * 16]
    wait_ready(lenient.url, lenient.process)
    assert server_ready(lenient.url)
    assert health(lenient.url, "broken") == NOT_SERVING


def _probe(url: str, service: str) -> int | None:
    """Health status, or None while the server does not answer yet."""
    try:
        return health(url, service)
    except grpc.RpcError:
        return None


def warmup(dims: int, count: int = 2) -> str:
    sample = f"data_type: TYPE_FP32 dims: [ {dims} ] random_data: true"
    return (
        f'model_warmup [ {{ name: "w" batch_size: 2 count: {count} '
        f'inputs {{ key: "INPUT0" value: {{ {sample} }} }} }} ]'
    )


def test_model_warmup_runs_before_ready(start_server: StartServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    build_slow(repo, "warm", iterations=4, config_extra=warmup(WIDTH))
    # A sample the model cannot run: the failure shows the warmup ran before ready.
    build_slow(repo, "cold", iterations=4, config_extra=warmup(3))
    srv = start_server(repo)
    assert model_ready(srv.url, "warm")
    assert not model_ready(srv.url, "cold")
    with Client(srv.url, timeout=10) as client:
        assert infer_slow(client, 1, "warm") is None
        reason = {m.name: m.reason for m in client.models()}["cold"]
    assert "warmup 'w' failed" in reason
    assert health(srv.url, "cold") == NOT_SERVING


# --- 5. connection recycling --------------------------------------------------------------


@pytest.fixture
def simple_repository(tmp_path: Path) -> Iterator[Path]:
    repo = tmp_path / "simple-repo"
    build_simple(repo)
    yield repo


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's TCP table")
def test_max_connection_age_recycles_without_errors(
    start_server: StartServer, simple_repository: Path
) -> None:
    srv = start_server(simple_repository, "--grpc-max-connection-age", "1")
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    earlier = client_ports(srv.grpc_port)  # e.g. the readiness probe's, closing
    ports: set[int] = set()
    calls = 0
    # No retries: recycling must be invisible to callers (GOAWAY, then a new connection).
    with Client(srv.url, timeout=10, retries=0) as client:
        started = time.monotonic()
        while time.monotonic() - started < 3.5:
            out = client.infer("simple", {"INPUT0": a, "INPUT1": a})
            np.testing.assert_array_equal(out["OUTPUT0"], 2 * a)
            calls += 1
            ports |= client_ports(srv.grpc_port)
            time.sleep(0.01)
    assert calls > 50
    # One connection at a time, replaced about every second (±10% jitter): 3 or 4.
    assert len(ports - earlier) >= 3, (calls, ports, earlier)
