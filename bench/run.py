"""Lockgate's benchmark: where the time goes, as ratios measured in one run.

In one run on one machine, with the load generator in its own process and
closed-loop concurrency (each caller sends its next request when the last
returns):

1. in-process ONNX Runtime throughput of each model at batch 1 and at the
   batch sizes the batcher reached (the ceiling for model work);
2. a bare grpc.aio servicer that answers ModelInfer by echoing its inputs
   (the ceiling for a Python gRPC front end), with each model's payload;
3. Lockgate with dynamic batching off and on.

Echo, batched and unbatched Lockgate are measured back to back at each point,
``--rounds`` times (default 2, ``--duration`` 3 s each), and each figure is
the median over rounds, so that a machine whose speed drifts shifts all three
alike. It prints a table of throughput, p50/p99 latency and mean batch size,
the ratios Lockgate/echo, batched/unbatched and Lockgate/in-process, and saves
everything as JSON so two runs can be compared. Usage: ``make bench``,
``make bench ARGS="--rounds 5"`` or ``python bench/run.py --quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import text_format
from grpc_health.v1 import health, health_pb2_grpc

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, launch_server, spawn_load, wait_ready  # noqa: E402
from lockgate_client._loop import run  # noqa: E402
from models.build import build_image_classifier, build_mlp, build_simple  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
STATS = "/inference.GRPCInferenceService/ModelStatistics"

#: model -> (input names/dtypes/row shape, concurrencies to test)
MODELS: dict[str, dict[str, Any]] = {
    "simple": {
        "inputs": [("INPUT0", "INT32", (16,)), ("INPUT1", "INT32", (16,))],
        "concurrency": [1, 8, 16, 32, 64],
    },
    "mlp": {"inputs": [("INPUT", "FP32", (512,))], "concurrency": [1, 8, 32, 64]},
    "image_classifier": {"inputs": [("INPUT", "FP32", (3, 224, 224))], "concurrency": [1, 16]},
}
NUMPY = {"INT32": np.int32, "FP32": np.float32}


# --- requests -----------------------------------------------------------------


def request_bytes(model: str, rows: int = 1) -> bytes:
    """A serialized ModelInferRequest with random inputs, built once."""
    rng = np.random.default_rng(0)
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape in MODELS[model.removesuffix("_nobatch")]["inputs"]:
        full = (rows, *shape)
        array = (rng.random(full) * 100).astype(NUMPY[datatype])
        request.inputs.add(name=name, datatype=datatype, shape=full)
        request.raw_input_contents.append(array.tobytes())
    return request.SerializeToString()


# --- servers --------------------------------------------------------------------


def build_repository(directory: Path) -> Path:
    """The example models twice: as configured (batching) and without batching."""
    for build in (build_simple, build_mlp, build_image_classifier):
        model_dir = build(directory)
        config = mc.ModelConfig()
        text_format.Parse((model_dir / "config.pbtxt").read_text(), config)
        config.ClearField("dynamic_batching")
        config.name += "_nobatch"
        twin = directory / config.name
        (twin / "1").mkdir(parents=True, exist_ok=True)
        (twin / "config.pbtxt").write_text(text_format.MessageToString(config))
        target = twin / "1" / "model.onnx"
        if not target.exists():
            target.symlink_to((model_dir / "1" / "model.onnx").resolve())
    return directory


def start_lockgate(repository: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    return launch_server(repository, None, *extra, grpc_port=port, timeout=120).process


def start_echo(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--echo-server", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_ready(f"127.0.0.1:{port}", process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def echo_server(port: int) -> None:
    """The front-end ceiling: parse ModelInfer, answer with the inputs as outputs."""

    async def model_infer(request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return pb.ModelInferResponse(
            model_name=request.model_name,
            model_version="1",
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=t.name, datatype=t.datatype, shape=t.shape
                )
                for t in request.inputs
            ],
            raw_output_contents=request.raw_input_contents,
        )

    async def server_ready(request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            model_infer,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString,
        ),
        "ServerReady": grpc.unary_unary_rpc_method_handler(
            server_ready,
            request_deserializer=pb.ServerReadyRequest.FromString,
            response_serializer=pb.ServerReadyResponse.SerializeToString,
        ),
    }
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.max_send_message_length", 2**31 - 1),
        ]
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers)]
    )
    # Readiness is probed as for Lockgate; the servicer starts out SERVING.
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(0)


# --- load generator (its own process) -----------------------------------------------


async def closed_loop(
    port: int, payload: bytes, concurrency: int, duration: float, warmup: float
) -> dict[str, Any]:
    """``concurrency`` callers, each sending its next request when the last returns."""
    options = [("grpc.max_receive_message_length", 2**31 - 1)]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
    # Bytes in, bytes out: the generator spends no CPU on protobuf.
    call = channel.unary_unary(INFER)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration

    async def caller() -> None:
        nonlocal errors
        while True:
            sent = time.perf_counter()
            if sent >= end:
                return
            try:
                await call(payload, timeout=60)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            done = time.perf_counter()
            if sent >= measure_from:
                latencies.append(done - sent)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    await channel.close()
    return {"count": len(latencies), "errors": errors, "duration": duration, "latencies": latencies}


def run_load(port: int, model: str, concurrency: int, duration: float) -> dict[str, Any]:
    """Run the load generator in a separate process and collect its summary."""
    return spawn_load(__file__, port, request_bytes(model), concurrency, duration)


def load_main(port: int, payload_file: str, concurrency: int, duration: float) -> None:
    payload = Path(payload_file).read_bytes()
    raw = run(closed_loop(port, payload, concurrency, duration, warmup=1.0))
    latencies = sorted(raw["latencies"])
    summary = {
        "throughput": len(latencies) / raw["duration"],
        "errors": raw["errors"],
        "p50_ms": _percentile(latencies, 50) * 1e3,
        "p99_ms": _percentile(latencies, 99) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else 0.0,
    }
    print(json.dumps(summary))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, round(q / 100 * (len(values) - 1)))
    return values[index]


# --- measurements ------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    model: str
    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def model_counts(port: int, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) from the server's ModelStatistics."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(STATS)
        reply = pb.ModelStatisticsResponse.FromString(
            call(pb.ModelStatisticsRequest(name=model).SerializeToString(), timeout=10)
        )
    stats = reply.model_stats[0]
    return stats.inference_count, stats.execution_count


def compute_seconds(port: int, model: str) -> float:
    """Seconds the model's instances have spent computing batches (ModelStatistics).

    The sum over batch sizes of compute input + infer + output: each batch
    counted once, however many requests it held.
    """
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(STATS)
        reply = pb.ModelStatisticsResponse.FromString(
            call(pb.ModelStatisticsRequest(name=model).SerializeToString(), timeout=10)
        )
    return (
        sum(
            b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns
            for b in reply.model_stats[0].batch_stats
        )
        / 1e9
    )


def measure_lockgate(port: int, model: str, concurrency: int, duration: float) -> Row:
    before = model_counts(port, model)
    result = run_load(port, model, concurrency, duration)
    after = model_counts(port, model)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    return Row(
        target="lockgate",
        model=model,
        concurrency=concurrency,
        throughput=result["throughput"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        errors=result["errors"],
        mean_batch=inferences / executions if executions else 0.0,
    )


def in_process(repository: Path, model: str, batch: int, seconds: float) -> float:
    """Rows per second of a bare ONNX Runtime session at ``batch`` rows per run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(repository / model / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    request = pb.ModelInferRequest.FromString(request_bytes(model, batch))
    feeds = {
        t.name: np.frombuffer(raw, NUMPY[t.datatype]).reshape(tuple(t.shape))
        for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
    }
    session.run(None, feeds)
    runs = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        session.run(None, feeds)
        runs += 1
    return runs * batch / elapsed


def median_row(rows: list[Row]) -> Row:
    """One row from several rounds of the same point: the median of each figure."""
    first = rows[0]
    return Row(
        target=first.target,
        model=first.model,
        concurrency=first.concurrency,
        throughput=statistics.median(r.throughput for r in rows),
        p50_ms=statistics.median(r.p50_ms for r in rows),
        p99_ms=statistics.median(r.p99_ms for r in rows),
        errors=sum(r.errors for r in rows),
        mean_batch=statistics.median(r.mean_batch for r in rows),
        extra={"rounds": len(rows), "throughputs": [round(r.throughput, 1) for r in rows]},
    )


# --- report --------------------------------------------------------------------------------


def ratios(rows: list[Row], ceilings: dict[str, dict[int, float]]) -> list[dict[str, Any]]:
    by_key = {(r.target, r.model, r.concurrency): r for r in rows}
    out = []
    for row in rows:
        if row.target != "lockgate" or row.model.endswith("_nobatch"):
            continue
        entry: dict[str, Any] = {"model": row.model, "concurrency": row.concurrency}
        echo = by_key.get(("echo", row.model, row.concurrency))
        if echo and echo.throughput:
            entry["lockgate_vs_echo"] = row.throughput / echo.throughput
        unbatched = by_key.get(("lockgate", row.model + "_nobatch", row.concurrency))
        if unbatched and unbatched.throughput:
            entry["batched_vs_unbatched"] = row.throughput / unbatched.throughput
        batch = max(1, round(row.mean_batch))
        ceiling = ceilings.get(row.model, {})
        nearest = min(ceiling, key=lambda b: abs(b - batch)) if ceiling else None
        if nearest is not None:
            entry["in_process_batch"] = nearest
            entry["lockgate_vs_in_process"] = row.throughput / ceiling[nearest]
        out.append(entry)
    return out


def print_report(
    rows: list[Row], ceilings: dict[str, dict[int, float]], ratio_rows: list[dict[str, Any]]
) -> None:
    print("\nIn-process ONNX Runtime (rows/s):")
    for model, by_batch in ceilings.items():
        cells = ", ".join(f"batch {b}: {v:,.0f}" for b, v in sorted(by_batch.items()))
        print(f"  {model:<18} {cells}")
    print(
        f"\n{'target':<9} {'model':<24} {'conc':>4} {'infer/s':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'batch':>6} {'errors':>6}"
    )
    for r in rows:
        print(
            f"{r.target:<9} {r.model:<24} {r.concurrency:>4} {r.throughput:>10,.0f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.mean_batch:>6.1f} {r.errors:>6}"
        )
    print("\nRatios (same run):")
    for entry in ratio_rows:
        parts = [f"{k}={v:.2f}" for k, v in entry.items() if isinstance(v, float)]
        print(f"  {entry['model']:<18} c={entry['concurrency']:<3} " + "  ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repository", type=Path, default=None, help="(ignored: the bench builds its own)"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument(
        "--rounds", type=int, default=2, help="measure every point this often; report medians"
    )
    parser.add_argument("--models", default="simple,mlp,image_classifier")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        run(echo_server(args.echo_server))
        return 0
    if args.load:
        port, payload, concurrency, duration = args.load
        load_main(int(port), payload, int(concurrency), float(duration))
        return 0
    duration = 2.0 if args.quick else args.duration
    models = [m for m in args.models.split(",") if m]
    work = Path(tempfile.mkdtemp(prefix="lockgate-bench-"))
    atexit.register(shutil.rmtree, work, True)  # the models: 25 MB a run
    repository = build_repository(work / "repository")

    # Both servers stay up and every (model, concurrency) point is measured
    # echo, batched, unbatched back to back, for --rounds rounds; each figure
    # is the median over rounds. A noisy machine then shifts all three alike,
    # and the ratios hold even where the absolute numbers drift.
    echo_port = free_port()
    echo = start_echo(echo_port)
    port = free_port()
    try:
        server = start_lockgate(repository, port, [])
    except BaseException:
        stop(echo)
        raise
    samples: dict[tuple[str, str, int], list[Row]] = {}
    try:
        for round_number in range(1, args.rounds + 1):
            for model in models:
                for concurrency in MODELS[model]["concurrency"]:
                    if args.quick and concurrency not in (1, 16, 32):
                        continue
                    result = run_load(echo_port, model, concurrency, duration)
                    measured = [
                        Row(
                            "echo",
                            model,
                            concurrency,
                            result["throughput"],
                            result["p50_ms"],
                            result["p99_ms"],
                            result["errors"],
                        )
                    ]
                    for variant in (model, model + "_nobatch"):
                        measured.append(measure_lockgate(port, variant, concurrency, duration))
                    for row in measured:
                        samples.setdefault((row.target, row.model, concurrency), []).append(row)
                    print(
                        f"round {round_number} {model} c={concurrency}: "
                        + ", ".join(
                            f"{r.target if r.target == 'echo' else r.model} {r.throughput:,.0f}/s"
                            for r in measured
                        ),
                        file=sys.stderr,
                    )
    finally:
        stop(server)
        stop(echo)
    rows = [median_row(group) for group in samples.values()]
    rows.sort(key=lambda r: (r.target != "echo", r.model, r.concurrency))

    ceilings: dict[str, dict[int, float]] = {}
    for model in models:
        batches = {1} | {
            max(1, round(r.mean_batch)) for r in rows if r.model == model and r.target == "lockgate"
        }
        ceilings[model] = {
            b: in_process(repository, model, b, min(duration, 2.0)) for b in sorted(batches)
        }
    ratio_rows = ratios(rows, ceilings)
    print_report(rows, ceilings, ratio_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"bench-{stamp}.json"
    path.write_text(
        json.dumps(
            {
                "when": stamp,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": sys.version.split()[0],
                },
                "duration": duration,
                "rounds": args.rounds,
                "rows": [asdict(r) for r in rows],
                "in_process": ceilings,
                "ratios": ratio_rows,
            },
            indent=2,
        )
    )
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
