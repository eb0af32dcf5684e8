"""Lockgate's soak test: hours of production in minutes, watching memory and errors.

Starts ``lockgate serve`` on the example repository and sends mixed traffic for
``--seconds`` (default ``$SOAK_SECONDS`` or 600) from ``--concurrency`` callers:
every example model at varied batch sizes, streams, calls cancelled midway or
given impossible deadlines, new connections, and deliberately bad requests.
Every answer is checked: a wrong result or an unexpected status counts as an
unexpected error; the statuses that the bad, cancelled and late requests
deserve count as expected errors.

Every 10 s it prints the window's throughput, errors by status and the
server's resident memory (``VmRSS`` from /proc, or the metrics endpoint's
``process_resident_memory_bytes``). At the end: RSS growth from the end of
the warm-up to the last window, and a verdict: it exits 1 if any error was
unexpected, the server died or did not drain cleanly, or RSS grew by more
than ``--max-growth`` percent. Results are also saved as JSON.

Usage: ``make soak`` or ``python bench/soak.py --repository models/repository
--seconds 120``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, wait_ready  # noqa: E402
from lockgate_client._proto import grpc_service_pb2 as pb  # noqa: E402
from models.build import build_repository  # noqa: E402

SERVICE = "/inference.GRPCInferenceService/"
EXAMPLE_MODELS = ("simple", "simple_string", "mlp", "image_classifier")
OK = "OK"
WRONG_RESULT = "WRONG_RESULT"
Array = np.ndarray[Any, Any]


# --- bookkeeping -------------------------------------------------------------------------------


@dataclass
class Window:
    """What happened during one reporting window."""

    start_s: float
    requests: int = 0
    rows: int = 0
    expected: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    rss_mib: list[float] = field(default_factory=list)


@dataclass
class Tally:
    """Outcomes over the run, by window."""

    window_s: float
    started: float = field(default_factory=time.monotonic)
    windows: list[Window] = field(default_factory=list)
    #: A few examples of each unexpected outcome, for the report.
    examples: dict[str, list[str]] = field(default_factory=dict)

    def current(self) -> Window:
        index = int((time.monotonic() - self.started) // self.window_s)
        while len(self.windows) <= index:
            self.windows.append(Window(start_s=len(self.windows) * self.window_s))
        return self.windows[index]

    def ok(self, rows: int) -> None:
        window = self.current()
        window.requests += 1
        window.rows += rows

    def expected(self, code: str) -> None:
        self.current().expected[code] += 1

    def unexpected(self, code: str, scenario: str, detail: str) -> None:
        self.current().unexpected[code] += 1
        seen = self.examples.setdefault(f"{scenario}: {code}", [])
        if len(seen) < 3:
            seen.append(detail[:300])


# --- requests ----------------------------------------------------------------------------------


def tensor(name: str, datatype: str, array: Array) -> tuple[Any, bytes]:
    spec = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
    if datatype == "BYTES":
        raw = b"".join(len(s).to_bytes(4, "little") + s for s in array.reshape(-1))
        return spec, raw
    return spec, array.tobytes()


def request(model: str, *tensors: tuple[Any, bytes], request_id: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[t[0] for t in tensors],
        raw_input_contents=[t[1] for t in tensors],
    )


def output(reply: pb.ModelInferResponse, name: str, dtype: Any) -> Array:
    for index, out in enumerate(reply.outputs):
        if out.name == name:
            if dtype is object:
                return _strings(reply.raw_output_contents[index]).reshape(tuple(out.shape))
            return np.frombuffer(reply.raw_output_contents[index], dtype).reshape(tuple(out.shape))
    raise KeyError(name)


def _strings(raw: bytes) -> Array:
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "little")
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return np.array(items, dtype=object)


class WrongResult(Exception):
    """The server answered, but not what the model computes."""


class Expected(Exception):
    """An outcome the scenario provoked on purpose that raised no RpcError."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def check(condition: bool, what: str) -> None:
    if not condition:
        raise WrongResult(what)


# --- traffic -----------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    weight: int
    run: Callable[[Traffic], Awaitable[int]]
    #: Status codes this scenario deliberately provokes.
    expected: frozenset[str] = frozenset()
    #: Success would be wrong: the request is invalid.
    must_fail: bool = False


class Traffic:
    """The calls one caller makes: each scenario returns the rows it got answered."""

    def __init__(self, channel: grpc.aio.Channel, url: str, rng: random.Random) -> None:
        self.channel = channel
        self.url = url
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.randrange(2**32))
        self.infer = channel.unary_unary(
            SERVICE + "ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )

    async def simple(self) -> int:
        rows = self.rng.randint(1, 8)
        a = self.np_rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
        b = self.np_rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
        reply = await self.infer(
            request("simple", tensor("INPUT0", "INT32", a), tensor("INPUT1", "INT32", b)),
            timeout=60,
        )
        check(np.array_equal(output(reply, "OUTPUT0", np.int32), a + b), "simple: a + b")
        check(np.array_equal(output(reply, "OUTPUT1", np.int32), a - b), "simple: a - b")
        return rows

    async def simple_string(self) -> int:
        rows = self.rng.randint(1, 4)
        a = self.np_rng.integers(0, 100, (rows, 16))
        b = self.np_rng.integers(0, 100, (rows, 16))
        texts = [np.vectorize(lambda v: str(v).encode(), otypes=[object])(x) for x in (a, b)]
        reply = await self.infer(
            request(
                "simple_string",
                tensor("INPUT0", "BYTES", texts[0]),
                tensor("INPUT1", "BYTES", texts[1]),
            ),
            timeout=60,
        )
        got = output(reply, "OUTPUT0", object)
        check([int(v) for v in got.reshape(-1)] == (a + b).reshape(-1).tolist(), "strings")
        return rows

    async def mlp(self) -> int:
        rows = self.rng.choice([1, 2, 4, 8, 16])
        x = self.np_rng.random((rows, 512), dtype=np.float32)
        reply = await self.infer(request("mlp", tensor("INPUT", "FP32", x)), timeout=60)
        out = output(reply, "OUTPUT", np.float32)
        check(out.shape == (rows, 512) and bool(np.isfinite(out).all()), "mlp shape")
        return rows

    async def image_classifier(self) -> int:
        rows = self.rng.randint(1, 2)
        x = self.np_rng.random((rows, 3, 224, 224), dtype=np.float32)
        reply = await self.infer(
            request("image_classifier", tensor("INPUT", "FP32", x)), timeout=60
        )
        out = output(reply, "OUTPUT", np.float32)
        check(out.shape == (rows, 1000), "classifier shape")
        check(bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-3)), "softmax sums to 1")
        return rows

    async def stream(self) -> int:
        count = self.rng.randint(1, 4)
        inputs = [self.np_rng.integers(0, 100, (1, 16), dtype=np.int32) for _ in range(count)]
        stream = self.channel.stream_stream(
            SERVICE + "ModelStreamInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        messages = [
            request(
                "simple",
                tensor("INPUT0", "INT32", x),
                tensor("INPUT1", "INT32", x),
                request_id=str(i),
            )
            for i, x in enumerate(inputs)
        ]
        answers = {}
        async for answer in stream(iter(messages), timeout=60):
            check(not answer.error_message, f"stream: {answer.error_message}")
            answers[answer.infer_response.id] = answer.infer_response
        check(len(answers) == count, "stream: one answer per request")
        for i, x in enumerate(inputs):
            total = output(answers[str(i)], "OUTPUT0", np.int32)
            check(np.array_equal(total, 2 * x), "stream: a + a")
        return count

    async def cancelled(self) -> int:
        """Leaves midway: the server must drop the work and free its place."""
        rows = self.rng.randint(1, 8)
        x = self.np_rng.random((rows, 512), dtype=np.float32)
        call = self.infer(request("mlp", tensor("INPUT", "FP32", x)), timeout=60)
        await asyncio.sleep(self.rng.random() * 0.01)
        if call.done():
            await call
            return rows
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:  # grpc.aio's answer to a call cancelled here
            raise Expected("CANCELLED") from None
        return rows

    async def late(self) -> int:
        """A deadline no server can meet."""
        x = self.np_rng.random((1, 3, 224, 224), dtype=np.float32)
        await self.infer(request("image_classifier", tensor("INPUT", "FP32", x)), timeout=0.001)
        return 1

    async def bad(self) -> int:
        """A client's mistake, one of several kinds."""
        a = np.zeros((1, 16), np.int32)
        cases = [
            request("simple", tensor("INPUT0", "INT32", a)),  # an input missing
            request("simple", tensor("INPUT0", "FP32", a), tensor("INPUT1", "INT32", a)),
            request("simple", tensor("INPUT0", "INT32", np.zeros((9, 16), np.int32))),
            request("no_such_model", tensor("INPUT0", "INT32", a)),
            request("mlp", tensor("INPUT", "FP32", np.zeros((1, 500), np.float32))),
        ]
        truncated = request("simple", tensor("INPUT0", "INT32", a), tensor("INPUT1", "INT32", a))
        truncated.raw_input_contents[1] = truncated.raw_input_contents[1][:-3]
        huge = request("simple_string", tensor("INPUT0", "BYTES", np.array([[b"1"] * 16], object)))
        huge.inputs[0].shape[:] = [1, 2**40]
        cases += [truncated, huge]
        await self.infer(self.rng.choice(cases), timeout=60)
        return 1

    async def metadata(self) -> int:
        call = self.channel.unary_unary(
            SERVICE + "ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        model = self.rng.choice(EXAMPLE_MODELS)
        reply = await call(pb.ModelMetadataRequest(name=model), timeout=60)
        check(reply.name == model, "metadata name")
        return 0

    async def new_connection(self) -> int:
        """A client that connects, asks once and leaves."""
        async with grpc.aio.insecure_channel(self.url) as channel:
            return await Traffic(channel, self.url, self.rng).simple()


SCENARIOS = [
    Scenario("simple", 30, Traffic.simple),
    Scenario("simple_string", 12, Traffic.simple_string),
    Scenario("mlp", 16, Traffic.mlp),
    Scenario("image_classifier", 4, Traffic.image_classifier),
    Scenario("stream", 8, Traffic.stream),
    Scenario("metadata", 4, Traffic.metadata),
    Scenario("new_connection", 2, Traffic.new_connection),
    Scenario("cancelled", 6, Traffic.cancelled, frozenset({"CANCELLED"})),
    Scenario("late", 3, Traffic.late, frozenset({"DEADLINE_EXCEEDED"})),
    Scenario("bad", 10, Traffic.bad, frozenset({"INVALID_ARGUMENT", "NOT_FOUND"}), True),
]


async def caller(url: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    weights = [s.weight for s in SCENARIOS]
    async with grpc.aio.insecure_channel(url) as channel:
        traffic = Traffic(channel, url, rng)
        while time.monotonic() < until:
            scenario = rng.choices(SCENARIOS, weights)[0]
            try:
                rows = await scenario.run(traffic)
            except grpc.aio.AioRpcError as error:
                code = error.code().name
                if code in scenario.expected:
                    tally.expected(code)
                else:
                    tally.unexpected(code, scenario.name, error.details() or "")
            except Expected as outcome:
                tally.expected(outcome.code)
            except WrongResult as wrong:
                tally.unexpected(WRONG_RESULT, scenario.name, str(wrong))
            else:
                if scenario.must_fail:
                    tally.unexpected(OK, scenario.name, "an invalid request succeeded")
                else:
                    tally.ok(rows)


# --- the server --------------------------------------------------------------------------------


def start_server(repository: Path, log_path: Path, extra: list[str]) -> tuple[Any, str, str]:
    port, metrics_port = free_port(), free_port()
    args = [
        *(sys.executable, "-m", "lockgate", "serve", "--model-repository", str(repository)),
        *("--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", str(metrics_port)),
        *("--drain-seconds", "30", *extra),
    ]
    # The checkout's own code, whether or not it is installed.
    paths = [str(ROOT / "server"), str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout=180)
    except (RuntimeError, TimeoutError) as exc:
        process.kill()
        raise SystemExit(f"{exc}; see {log_path}") from None
    return process, url, f"http://127.0.0.1:{metrics_port}/metrics"


def rss_mib(pid: int, metrics_url: str) -> float | None:
    """The server's resident memory: /proc where there is one, else its metrics."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("process_resident_memory_bytes "):
                    return float(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


async def sample_memory(pid: int, metrics_url: str, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        rss = await asyncio.to_thread(rss_mib, pid, metrics_url)
        if rss is not None:
            tally.current().rss_mib.append(rss)
        await asyncio.sleep(1.0)


# --- report ------------------------------------------------------------------------------------


def print_window(window: Window, window_s: float) -> None:
    rss = f"{statistics.median(window.rss_mib):8.1f}" if window.rss_mib else "       -"
    expected = sum(window.expected.values())
    unexpected = ",".join(f"{k}:{v}" for k, v in sorted(window.unexpected.items())) or "0"
    print(
        f"{window.start_s:6.0f} s {window.requests / window_s:9.1f} {window.rows / window_s:9.1f}"
        f" {expected:9d}  {rss}   {unexpected}",
        flush=True,
    )


async def report_windows(tally: Tally, until: float, seconds: float) -> None:
    """Print each window once it is over (and, at the end, every full one left)."""
    print(f"{'window':>8} {'req/s':>9} {'rows/s':>9} {'expected':>9}  {'RSS MiB':>8}   unexpected")
    printed = 0
    while True:
        finished = time.monotonic() >= until
        if not finished:
            await asyncio.sleep(0.5)
        done = int((time.monotonic() - tally.started) // tally.window_s)
        while printed < min(done, len(tally.windows)):
            window = tally.windows[printed]
            if window.start_s + tally.window_s <= seconds:
                print_window(window, tally.window_s)
            printed += 1
        if finished:
            return


def growth(windows: list[Window], warmup_s: float) -> dict[str, float | None]:
    """RSS after warm-up vs. at the end: medians of whole windows, robust to spikes."""
    settled = [w for w in windows if w.start_s >= warmup_s and w.rss_mib]
    if len(settled) < 2:
        return {"baseline_mib": None, "final_mib": None, "growth_percent": None}
    baseline = statistics.median(settled[0].rss_mib)
    final = statistics.median(settled[-1].rss_mib)
    peak = max(max(w.rss_mib) for w in settled)
    return {
        "baseline_mib": round(baseline, 1),
        "final_mib": round(final, 1),
        "peak_mib": round(peak, 1),
        "growth_percent": round(100 * (final - baseline) / baseline, 2),
    }


async def soak(url: str, pid: int, metrics_url: str, args: argparse.Namespace) -> Tally:
    tally = Tally(window_s=args.window)
    until = tally.started + args.seconds
    callers = [caller(url, args.seed + i, until, tally) for i in range(args.concurrency)]
    await asyncio.gather(
        *callers,
        sample_memory(pid, metrics_url, until, tally),
        report_windows(tally, until, args.seconds),
    )
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repository", type=Path, default=ROOT / "models" / "repository")
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600"))
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--window", type=float, default=10.0, help="report every N seconds")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the RSS baseline (default: a fifth of the run, at most 120)",
    )
    parser.add_argument("--max-growth", type=float, default=5.0, help="percent allowed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="passed on to lockgate serve"
    )
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(120.0, args.seconds / 5)
    if not all((args.repository / m / "config.pbtxt").is_file() for m in EXAMPLE_MODELS):
        print(f"building the example models into {args.repository}", flush=True)
        build_repository(args.repository)

    log_path = Path(tempfile.mkdtemp(prefix="lockgate-soak-")) / "server.log"
    process, url, metrics_url = start_server(args.repository, log_path, args.server_arg)
    print(
        f"soak: {args.seconds:.0f} s, {args.concurrency} callers, server pid {process.pid} "
        f"on {url}, log {log_path}",
        flush=True,
    )
    try:
        tally = asyncio.run(soak(url, process.pid, metrics_url, args))
        alive = process.poll() is None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            exit_code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            exit_code = process.wait()

    windows = [w for w in tally.windows if w.start_s < args.seconds]
    total = sum(w.requests for w in windows)
    expected: collections.Counter[str] = collections.Counter()
    unexpected: collections.Counter[str] = collections.Counter()
    for w in windows:
        expected.update(w.expected)
        unexpected.update(w.unexpected)
    memory = growth(windows, warmup)
    result = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "successful_requests": total,
        "throughput_per_s": round(total / args.seconds, 1),
        "expected_errors": dict(expected),
        "unexpected_errors": dict(unexpected),
        "unexpected_examples": tally.examples,
        "memory": memory,
        "warmup_s": warmup,
        "server_alive_at_end": alive,
        "server_exit_code": exit_code,
        "windows": [
            {**asdict(w), "expected": dict(w.expected), "unexpected": dict(w.unexpected)}
            for w in windows
        ],
    }
    print(f"\nsuccessful requests: {total} ({result['throughput_per_s']}/s)")
    print(f"expected errors:     {dict(expected) or 0}")
    print(f"unexpected errors:   {dict(unexpected) or 0}")
    for what, details in tally.examples.items():
        print(f"  {what}: {details}")
    if memory["growth_percent"] is None:
        # No verdict on memory without two whole windows after the warm-up.
        print(
            f"RSS: not measured: the run needs two {args.window:.0f} s windows after its "
            f"{warmup:.0f} s warm-up (run longer, or pass a shorter --warmup or --window)"
        )
    else:
        print(
            f"RSS: {memory['baseline_mib']} MiB after {warmup:.0f} s warm-up -> "
            f"{memory['final_mib']} MiB at the end ({memory['growth_percent']}% growth, "
            f"limit {args.max_growth}%); peak {memory.get('peak_mib')} MiB"
        )
    print(f"server alive at the end: {alive}; exit code after SIGTERM: {exit_code}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("soak-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path}")
    grew = memory["growth_percent"]
    failed = (
        bool(unexpected) or not alive or exit_code != 0 or grew is None or grew > args.max_growth
    )
    print("verdict:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
