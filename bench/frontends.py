"""``--frontends 2`` against ``--frontends 1``, as ratios measured in one run.

Both servers serve the same repository; every point is measured on one,
then on the other, for ``--rounds`` rounds, and each figure is the median
over rounds (a machine whose speed drifts shifts both alike). The points are
the ones issue 11 names:

* ``simple`` at 64 callers and ``image_classifier`` at 16: throughput;
* ``mlp`` at 32 callers: mean batch size (inference_count / execution_count
  from ModelStatistics): batching must stay whole across front ends; with
  it the share of the time the model's instance spent computing batches
  ("busy", from ModelStatistics' batch_stats), since in a closed loop an
  instance that waits longer between batches gets larger ones;
* server CPU per request: utime + stime of every server process (the
  supervisor and all its children, from /proc) over the measurement, divided
  by the inferences the server counted;
* ``simple`` at 1 caller: latency.

The load comes from NVIDIA's ``perf_analyzer`` (C++, one connection per
caller: ``TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT=1``) when it runs here
(docs/benchmarks.md says what it needs), else from a Python generator with
one channel per caller. ``--frontends-list 1,2,4,8``
and ``--concurrency`` give the many-core curve. Usage: ``make bench``
runs it after bench/run.py; alone: ``python bench/frontends.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    INFER,
    _percentile,
    build_repository,
    compute_seconds,
    model_counts,
    request_bytes,
)
from bench.serving import (  # noqa: E402
    ServerProcess,
    connection_counts,
    free_port,
    launch_server,
    process_tree,
    spawn_load,
)
from lockgate_client._loop import run  # noqa: E402

#: (model, callers): what is measured, and why (see the module docstring).
POINTS = [("simple", 64), ("image_classifier", 16), ("mlp", 32), ("simple", 1)]
PERF_ANALYZER = ROOT / ".venv" / "bin" / "perf_analyzer"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Point:
    frontends: int
    model: str
    callers: int
    throughput: float
    p50_ms: float
    mean_batch: float
    #: Share of the time the model's instance spent computing batches.
    busy: float
    cpu_ms_per_request: float
    errors: int
    client: str
    #: Client connections per server process while loaded, e.g. "2+1" (the
    #: kernel spreads connections, not requests, over front ends).
    connections: str = ""


# --- the server's CPU -------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def connections(port: int, pids: list[int]) -> str:
    """Established connections to ``port`` per process of ``pids``, as "a+b"."""
    counts = [n for n in connection_counts(port, pids) if n]
    return "+".join(str(c) for c in sorted(counts, reverse=True))


# --- load ------------------------------------------------------------------------------


def perf_analyzer_env() -> dict[str, str] | None:
    """perf_analyzer's environment if it runs here, else None."""
    if not PERF_ANALYZER.exists():
        return None
    env = dict(os.environ)
    # One connection per caller (the "one channel per caller"): by
    # default perf_analyzer shares a connection between up to 6 callers, and
    # SO_REUSEPORT spreads connections, so 16 callers made 3 connections that
    # fell 2+1 or 3+0 on two front ends.
    env.setdefault("TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT", "1")
    cudart = Path("/tmp/cudart/nvidia/cuda_runtime/lib")
    if cudart.is_dir():
        env["LD_LIBRARY_PATH"] = f"{cudart}:{env.get('LD_LIBRARY_PATH', '')}"
    probe = subprocess.run([str(PERF_ANALYZER), "--version"], env=env, capture_output=True)
    return env if probe.returncode == 0 else None


def run_perf_analyzer(
    env: dict[str, str], port: int, model: str, callers: int, seconds: float
) -> dict[str, float]:
    out = subprocess.run(
        [
            str(PERF_ANALYZER),
            *("-m", model, "-i", "grpc", "-u", f"127.0.0.1:{port}"),
            *("--concurrency-range", str(callers), "-p", str(int(seconds * 1000))),
            # Accept what three windows give: this machine is shared, never stable.
            *("--max-trials", "3", "--stability-percentage", "500"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    throughput = float(re.findall(r"Throughput: ([\d.]+) infer/sec", out)[-1])
    p50 = float(re.findall(r"p50 latency: (\d+) usec", out)[-1]) / 1000
    return {"throughput": throughput, "p50_ms": p50, "errors": 0}


async def closed_loop(port: int, payload: bytes, callers: int, seconds: float) -> dict[str, Any]:
    """Callers on a channel each (so the kernel spreads them over the front ends)."""
    options = [("grpc.max_receive_message_length", 2**31 - 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(callers)
    ]
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + 1.0
    end = measure_from + seconds

    async def caller(channel: grpc.aio.Channel) -> None:
        nonlocal errors
        call = channel.unary_unary(INFER)
        while (sent := time.perf_counter()) < end:
            try:
                await call(payload, timeout=60)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if sent >= measure_from:
                latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(caller(c) for c in channels))
    for channel in channels:
        await channel.close()
    latencies.sort()
    return {
        "throughput": len(latencies) / seconds,
        "p50_ms": _percentile(latencies, 50) * 1e3,
        "errors": errors,
    }


def run_python_load(port: int, model: str, callers: int, seconds: float) -> dict[str, float]:
    return spawn_load(__file__, port, request_bytes(model), callers, seconds)


# --- one point ---------------------------------------------------------------------------


def measure(
    server: ServerProcess,
    frontends: int,
    model: str,
    callers: int,
    seconds: float,
    env: dict[str, str] | None,
) -> Point:
    port = server.grpc_port
    pids = process_tree(server.process.pid)
    before_counts = model_counts(port, model)
    before_compute = compute_seconds(port, model)
    before_cpu = cpu_seconds(pids)
    started = time.monotonic()
    seen: list[str] = []
    # Sampled once the load generator has connected (it runs >= 3 windows).
    sampler = threading.Timer(1.5, lambda: seen.append(connections(port, pids)))
    sampler.start()
    if env is not None:
        result = run_perf_analyzer(env, port, model, callers, seconds)
    else:
        result = run_python_load(port, model, callers, seconds)
    used = cpu_seconds(pids) - before_cpu
    elapsed = time.monotonic() - started
    sampler.cancel()
    computed = compute_seconds(port, model) - before_compute
    after_counts = model_counts(port, model)
    inferences = after_counts[0] - before_counts[0]
    executions = after_counts[1] - before_counts[1]
    return Point(
        frontends=frontends,
        model=model,
        callers=callers,
        throughput=result["throughput"],
        p50_ms=result["p50_ms"],
        mean_batch=inferences / executions if executions else 0.0,
        busy=computed / elapsed,
        cpu_ms_per_request=used * 1000 / inferences if inferences else 0.0,
        errors=int(result["errors"]),
        client="perf_analyzer" if env is not None else "python",
        connections=seen[0] if seen else "",
    )


def median_point(points: list[Point]) -> Point:
    first = points[0]
    return Point(
        frontends=first.frontends,
        model=first.model,
        callers=first.callers,
        throughput=statistics.median(p.throughput for p in points),
        p50_ms=statistics.median(p.p50_ms for p in points),
        mean_batch=statistics.median(p.mean_batch for p in points),
        busy=statistics.median(p.busy for p in points),
        cpu_ms_per_request=statistics.median(p.cpu_ms_per_request for p in points),
        errors=sum(p.errors for p in points),
        client=first.client,
        connections=" ".join(p.connections for p in points),
    )


# --- the run -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--quick", action="store_true", help="one round of 2 s")
    parser.add_argument("--frontends-list", default="1,2", help="front-end counts to compare")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="callers for every model (the many-core curve)"
    )
    parser.add_argument("--python-load", action="store_true", help="never use perf_analyzer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        port, payload, callers, seconds = args.load
        data = Path(payload).read_bytes()
        print(json.dumps(run(closed_loop(int(port), data, int(callers), float(seconds)))))
        return 0
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, args.seconds)
    counts = [int(n) for n in args.frontends_list.split(",")]
    points = [(m, args.concurrency) for m, _ in POINTS[:3]] if args.concurrency else POINTS
    env = None if args.python_load else perf_analyzer_env()
    print(f"load from {'perf_analyzer' if env else 'the Python generator'}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="lockgate-bench-frontends-"))
    repository = build_repository(work / "repository")
    servers: dict[int, ServerProcess] = {}
    samples: dict[tuple[int, str, int], list[Point]] = {}
    try:
        for n in counts:
            # Both up at once, measured in turn: the idle one costs (almost) nothing.
            servers[n] = launch_server(
                repository, None, grpc_port=free_port(), frontends=n, timeout=180
            )
        for round_number in range(1, rounds + 1):
            for model, callers in points:
                for n in counts:
                    point = measure(servers[n], n, model, callers, seconds, env)
                    samples.setdefault((n, model, callers), []).append(point)
                    print(
                        f"round {round_number} {model} c={callers} frontends={n}: "
                        f"{point.throughput:,.0f}/s p50 {point.p50_ms:.2f} ms "
                        f"batch {point.mean_batch:.1f} busy {point.busy:.0%} "
                        f"cpu {point.cpu_ms_per_request:.3f} ms/req"
                        f" connections {point.connections or '?'}",
                        file=sys.stderr,
                    )
    finally:
        for server in servers.values():
            server.stop(60)
        shutil.rmtree(work, ignore_errors=True)
    rows = [median_point(group) for group in samples.values()]
    report(rows, counts)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"frontends-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {"rounds": rounds, "seconds": seconds, "rows": [asdict(r) for r in rows]}, indent=2
        )
    )
    print(f"\nsaved {path}")
    return 0


def report(rows: list[Point], counts: list[int]) -> None:
    print(
        f"\n{'model':<18}{'callers':>8}{'fe':>4}{'infer/s':>10}{'p50 ms':>9}"
        f"{'batch':>7}{'busy':>6}{'cpu ms/req':>12}{'errors':>8}  connections per process"
    )
    for row in rows:
        print(
            f"{row.model:<18}{row.callers:>8}{row.frontends:>4}{row.throughput:>10,.0f}"
            f"{row.p50_ms:>9.2f}{row.mean_batch:>7.1f}{row.busy:>6.0%}"
            f"{row.cpu_ms_per_request:>12.3f}"
            f"{row.errors:>8}  {row.connections}"
        )
    base = counts[0]
    by = {(r.frontends, r.model, r.callers): r for r in rows}
    print(f"\nratios against --frontends {base} (same run, medians):")
    for (n, model, callers), row in by.items():
        ref = by.get((base, model, callers))
        if n == base or ref is None or not ref.throughput:
            continue
        p50 = row.p50_ms / ref.p50_ms if ref.p50_ms else 0.0
        cpu = row.cpu_ms_per_request / ref.cpu_ms_per_request if ref.cpu_ms_per_request else 0.0
        print(
            f"  {model} c={callers} frontends={n}: "
            f"throughput x{row.throughput / ref.throughput:.2f}, p50 x{p50:.2f}, "
            f"mean batch {row.mean_batch:.1f} vs {ref.mean_batch:.1f} (instance busy "
            f"{row.busy:.0%} vs {ref.busy:.0%}), CPU/request x{cpu:.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
