"""System shared memory vs tensors in the gRPC message, as ratios measured in one run.

For each point (``image_classifier`` at 16 callers, ``mlp`` at 32) the same
server is driven alternately with inputs and outputs in the request and
reply ("bytes") and in registered POSIX shared-memory regions ("shm"),
``--rounds`` times; each figure is the median over rounds, each ratio the median of the rounds'
ratios. The load comes
from NVIDIA's ``perf_analyzer`` (``--shared-memory none|system``) where it
starts on this machine, else from bench/run.py's closed-loop generator with
pre-serialized requests (in shm mode each names its input and output in a
region registered here). Mean batch sizes come from the server's statistics;
in-process ONNX Runtime is measured in each round, right after the shm run,
at the batch size that run reached.

Usage: ``python bench/shared_memory.py`` (``make bench`` runs it after
bench/run.py), ``--quick`` for a short run, ``--generator python`` to skip
perf_analyzer.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import model_counts  # noqa: E402
from bench.serving import ServerProcess, launch_server  # noqa: E402
from lockgate_client import Client, SharedMemoryRegion  # noqa: E402
from lockgate_client._proto import grpc_service_pb2 as pb  # noqa: E402
from models.build import build_image_classifier, build_mlp  # noqa: E402

#: (model, callers, input row shape, output row elements): the issue's two points.
POINTS = [
    ("image_classifier", 16, (3, 224, 224), 1000),
    ("mlp", 32, (512,), 512),
]
MODES = ("bytes", "shm")


@dataclass
class Sample:
    model: str
    callers: int
    mode: str
    throughput: float
    p50_ms: float
    mean_batch: float


# --- load: perf_analyzer ---------------------------------------------------------------


def perf_analyzer() -> str | None:
    """The perf_analyzer binary, if there is one and it starts here."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    binary = shutil.which("perf_analyzer") or (str(beside) if beside.exists() else None)
    if binary is None:
        return None
    probe = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    return None if "error while loading shared libraries" in probe.stderr else binary


def run_perf_analyzer(
    binary: str, server: ServerProcess, model: str, callers: int, mode: str, seconds: float
) -> tuple[float, float]:
    """(throughput, p50 ms) of one perf_analyzer run."""
    window_ms = max(500, int(seconds * 1000 / 3))
    result = subprocess.run(
        [
            *(binary, "-m", model, "-i", "grpc", "-u", server.url),
            *("--concurrency-range", str(callers)),
            *("--shared-memory", "system" if mode == "shm" else "none"),
            *("--measurement-interval", str(window_ms)),
            # Report what was measured; a shared machine is never "stable".
            *("--stability-percentage", "1000", "--max-trials", "4"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed:\n{result.stdout}\n{result.stderr}")
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    p50 = re.search(r"p50 latency: (\d+) usec", result.stdout)
    if throughput is None or p50 is None:
        raise RuntimeError(f"unexpected perf_analyzer output:\n{result.stdout}")
    return float(throughput.group(1)), int(p50.group(1)) / 1000


# --- load: bench/run.py's generator --------------------------------------------------------


def payload(model: str, shape: tuple[int, ...], output: int, region: str | None) -> bytes:
    """One serialized request; with ``region``, input and output live in it."""
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT", datatype="FP32", shape=(1, *shape))
    wanted = request.outputs.add(name="OUTPUT")
    if region is None:
        data = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
        request.raw_input_contents.append(data.tobytes())
    else:
        size = 4 * math.prod(shape)
        tensor.parameters["shared_memory_region"].string_param = region
        tensor.parameters["shared_memory_byte_size"].int64_param = size
        # Every caller's answer lands in the same slot: the bench never reads it.
        wanted.parameters["shared_memory_region"].string_param = region
        wanted.parameters["shared_memory_byte_size"].int64_param = 4 * output
        wanted.parameters["shared_memory_offset"].int64_param = size
    return request.SerializeToString()


def run_generator(server: ServerProcess, message: bytes, callers: int, seconds: float) -> Any:
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as handle:
        handle.write(message)
    try:
        out = subprocess.run(
            [
                *(sys.executable, str(ROOT / "bench" / "run.py"), "--load"),
                *(str(server.grpc_port), handle.name, str(callers), str(seconds)),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(handle.name)
    summary = json.loads(out.stdout)
    if summary["errors"]:
        raise RuntimeError(f"{summary['errors']} requests failed")
    return summary["throughput"], summary["p50_ms"]


def measure(
    server: ServerProcess,
    binary: str | None,
    message: bytes,
    model: str,
    callers: int,
    mode: str,
    seconds: float,
) -> Sample:
    """One point in one mode, with the mean batch size from the server's statistics."""
    before = model_counts(server.grpc_port, model)
    if binary:
        throughput, p50 = run_perf_analyzer(binary, server, model, callers, mode, seconds)
    else:
        throughput, p50 = run_generator(server, message, callers, seconds)
    after = model_counts(server.grpc_port, model)
    executions = after[1] - before[1]
    batch = (after[0] - before[0]) / executions if executions else 0.0
    return Sample(model, callers, mode, throughput, p50, batch)


def in_process(
    repository: Path, model: str, shape: tuple[int, ...], batch: int, seconds: float
) -> float:
    """Rows per second of ONNX Runtime alone, with the server's session options.

    Spinning off, as the server runs its sessions: on a machine shared with
    other work, spinning threads measure the contention, not the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(repository / model / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    feeds = {"INPUT": np.random.default_rng(0).random((batch, *shape), dtype=np.float32)}
    session.run(None, feeds)
    runs = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 3:
        session.run(None, feeds)
        runs += 1
    return runs * batch / elapsed


# --- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--generator", choices=["auto", "python"], default="auto")
    parser.add_argument("--models", default="image_classifier,mlp", help="points to measure")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    seconds, rounds = (1.5, 1) if args.quick else (args.duration, args.rounds)
    points = [p for p in POINTS if p[0] in args.models.split(",")]
    binary = perf_analyzer() if args.generator == "auto" else None
    generator = "perf_analyzer" if binary else "python"
    print(f"load generator: {generator}", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="lockgate-shm-bench-"))
    atexit.register(shutil.rmtree, work, True)  # the models: 25 MB a run
    repository = work / "repository"
    for build in (build_image_classifier, build_mlp):
        build(repository)
    server = launch_server(repository, None, timeout=120)
    samples: list[Sample] = []
    #: (model, batch, in-process rows/s, shm throughput / in-process) per round.
    ceilings: list[tuple[str, int, float, float]] = []
    try:
        with Client(server.url) as client:
            regions: list[SharedMemoryRegion] = []
            try:
                messages: dict[tuple[str, str], bytes] = {}
                for model, _, shape, output in points:
                    region = client.create_shared_memory(
                        f"bench_{model}", 4 * (math.prod(shape) + output)
                    )
                    regions.append(region)
                    region.write(np.random.default_rng(0).random((1, *shape), dtype=np.float32))
                    messages[model, "bytes"] = payload(model, shape, output, None)
                    messages[model, "shm"] = payload(model, shape, output, region.name)
                for round_number in range(1, rounds + 1):
                    for model, callers, shape, _ in points:
                        for mode in MODES:
                            sample = measure(
                                server, binary, messages[model, mode], model, callers, mode, seconds
                            )
                            samples.append(sample)
                            print(
                                f"round {round_number} {model} c={callers} {mode}: "
                                f"{sample.throughput:,.0f}/s, mean batch {sample.mean_batch:.1f}",
                                file=sys.stderr,
                            )
                        # In the same round, so that a machine whose speed drifts
                        # (shared cores) moves both sides of the ratio alike.
                        batch = max(1, round(sample.mean_batch))
                        rate = in_process(repository, model, shape, batch, min(seconds, 2.0))
                        ceilings.append((model, batch, rate, sample.throughput / rate))
            finally:
                for region in regions:
                    region.close()  # unregisters it, then removes it
    finally:
        server.stop()

    rows = []
    for model, callers, _, _ in points:
        entry: dict[str, Any] = {"model": model, "callers": callers}
        for mode in MODES:
            mine = [s for s in samples if s.model == model and s.mode == mode]
            entry[mode] = {
                "throughput": statistics.median(s.throughput for s in mine),
                "p50_ms": statistics.median(s.p50_ms for s in mine),
                "mean_batch": statistics.median(s.mean_batch for s in mine),
                "rounds": [round(s.throughput, 1) for s in mine],
            }
        mine = [c for c in ceilings if c[0] == model]
        entry["in_process_batch"] = statistics.median(c[1] for c in mine)
        entry["in_process"] = statistics.median(c[2] for c in mine)
        entry["shm_vs_bytes"] = statistics.median(
            shm.throughput / plain.throughput
            for shm, plain in zip(
                [s for s in samples if s.model == model and s.mode == "shm"],
                [s for s in samples if s.model == model and s.mode == "bytes"],
                strict=True,
            )
        )
        entry["shm_vs_in_process"] = statistics.median(c[3] for c in mine)
        rows.append(entry)

    print(f"\nShared memory vs bytes in the message ({generator}, medians of {rounds} round(s)):")
    print(f"{'model':<18} {'callers':>7} {'mode':<6} {'infer/s':>9} {'p50 ms':>8} {'batch':>6}")
    for entry in rows:
        for mode in MODES:
            figures = entry[mode]
            print(
                f"{entry['model']:<18} {entry['callers']:>7} {mode:<6} "
                f"{figures['throughput']:>9,.0f} {figures['p50_ms']:>8.2f} "
                f"{figures['mean_batch']:>6.1f}"
            )
    print("\nRatios (same run):")
    for entry in rows:
        print(
            f"  {entry['model']:<18} c={entry['callers']:<3} "
            f"shm_vs_bytes={entry['shm_vs_bytes']:.2f}  "
            f"shm_vs_in_process(batch {entry['in_process_batch']})="
            f"{entry['shm_vs_in_process']:.2f}  "
            f"(in-process {entry['in_process']:,.0f} rows/s)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"shm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "generator": generator,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "duration": seconds,
                "rounds": rounds,
                "samples": [asdict(s) for s in samples],
                "points": rows,
            },
            indent=2,
        )
    )
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
