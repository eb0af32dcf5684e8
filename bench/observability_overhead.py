"""What metrics (and, optionally, tracing) cost in throughput.

Starts Lockgate in turn with ``--metrics`` (scraped every second, as
Prometheus would) and with ``--no-metrics``, tracing off in both; drives
``simple`` with closed-loop concurrency (16 by default) from a separate
process for ``--seconds`` each, and prints the throughputs and their ratio.
``--rounds N`` alternates the two N times so that drift of the machine
affects both alike; ``--tracing`` adds a run with tracing on (spans to the
console exporter, discarded) for information.

Our Prometheus families are computed from ModelStats at scrape time, and
ModelStats exist either way (ModelStatistics needs them), so the metrics run
differs only by the scrapes. Usage::

    python bench/observability_overhead.py [--seconds 10] [--rounds 2] [--client sdk|raw]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lockgate_client._proto import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import launch_server  # noqa: E402
from lockgate_client._loop import run  # noqa: E402
from models.build import build_simple  # noqa: E402

MODEL = "simple"
INFER = "/inference.GRPCInferenceService/ModelInfer"


# --- the server under test --------------------------------------------------------------


class Scraper(threading.Thread):
    """GET /metrics once a second until stopped, like a Prometheus scrape."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stopping = threading.Event()
        self.bytes = 0
        #: Seconds each scrape took, request to last byte.
        self.times: list[float] = []

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            started = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as response:
                self.bytes = len(response.read())
            self.times.append(time.perf_counter() - started)


# --- the load generator (its own process) -----------------------------------------------


def inputs() -> dict[str, Any]:
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    return {"INPUT0": data, "INPUT1": data}


async def closed_loop(
    port: int, client_kind: str, concurrency: int, seconds: float, warmup: float
) -> int:
    """``concurrency`` callers, each sending its next request when the last returns."""
    if client_kind == "sdk":
        from lockgate_client import AsyncClient

        client = AsyncClient(f"127.0.0.1:{port}")
        feeds = inputs()

        async def send() -> None:
            await client.infer(MODEL, feeds)

        close = client.close
    else:  # raw: pre-serialized bytes, the least client CPU per request
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        request = pb.ModelInferRequest(model_name=MODEL)
        for name, value in inputs().items():
            request.inputs.add(name=name, datatype="INT32", shape=value.shape)
            request.raw_input_contents.append(value.tobytes())
        payload = request.SerializeToString()
        call = channel.unary_unary(INFER, None, None)

        async def send() -> None:
            await call(payload, timeout=60)

        async def close() -> None:
            await channel.close(None)

    done = 0
    measure_from = time.perf_counter() + warmup
    end = measure_from + seconds

    async def caller() -> None:
        nonlocal done
        while (sent := time.perf_counter()) < end:
            await send()
            if sent >= measure_from:
                done += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    await close()
    return done


def load_main(port: int, client_kind: str, concurrency: int, seconds: float) -> None:
    done = run(closed_loop(port, client_kind, concurrency, seconds, warmup=1.0))
    print(json.dumps({"throughput": done / seconds}))


# --- the comparison ---------------------------------------------------------------------


def measure(
    repository: Path,
    extra: list[str],
    args: argparse.Namespace,
    scrape: bool,
    env: dict[str, str] | None = None,
) -> tuple[float, list[float]]:
    server = launch_server(repository, None, "--log-level", "warning", *extra, env=env)
    scraper = Scraper(f"http://127.0.0.1:{server.metrics_port}/metrics") if scrape else None
    try:
        if scraper is not None:
            scraper.start()
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--load",
                str(server.grpc_port),
                args.client,
                str(args.concurrency),
                str(args.seconds),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        if scraper is not None:
            scraper.stopping.set()
            scraper.join()
        server.stop()
    return float(json.loads(out.stdout)["throughput"]), scraper.times if scraper else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=["sdk", "raw"], default="sdk")
    parser.add_argument("--tracing", action="store_true", help="also measure tracing on")
    parser.add_argument("--load", nargs=4, metavar=("PORT", "CLIENT", "CONC", "SECONDS"))
    args = parser.parse_args()
    if args.load:
        port, client_kind, concurrency, seconds = args.load
        load_main(int(port), client_kind, int(concurrency), float(seconds))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        build_simple(repository)
        results: dict[str, list[float]] = {"metrics": [], "no-metrics": [], "tracing": []}
        ratios: list[float] = []
        scrape_times: list[float] = []
        for round_ in range(1, args.rounds + 1):
            with_metrics, times = measure(repository, ["--metrics"], args, scrape=True)
            without, _ = measure(repository, ["--no-metrics"], args, scrape=False)
            results["metrics"].append(with_metrics)
            results["no-metrics"].append(without)
            ratios.append(with_metrics / without)
            scrape_times += times
            line = (
                f"round {round_}: --metrics {with_metrics:8.1f} req/s ({len(times)} scrapes)   "
                f"--no-metrics {without:8.1f} req/s   ratio {with_metrics / without:.3f}"
            )
            if args.tracing:
                # Tracing on, every request sampled, spans written to the console
                # exporter (stdout, discarded): the cost of making the spans.
                traced, _ = measure(
                    repository,
                    ["--trace"],
                    args,
                    scrape=False,
                    env={"OTEL_TRACES_EXPORTER": "console"},
                )
                results["tracing"].append(traced)
                line += f"   --trace {traced:8.1f} req/s ({traced / without:.3f})"
            print(line, flush=True)
    mean_with = statistics.fmean(results["metrics"])
    mean_without = statistics.fmean(results["no-metrics"])
    print(
        f"\n{MODEL}, concurrency {args.concurrency}, {args.client} client, "
        f"{args.seconds:.0f} s x {args.rounds} round(s) each, tracing off:\n"
        f"  --metrics (scraped 1/s): {mean_with:8.1f} req/s\n"
        f"  --no-metrics:            {mean_without:8.1f} req/s\n"
        f"  ratio of means:          {mean_with / mean_without:.3f} "
        f"(overhead {100 * (1 - mean_with / mean_without):+.1f}%)\n"
        f"  median of round ratios:  {statistics.median(ratios):.3f}"
    )
    if scrape_times:
        # A bound that other load on the machine hardly moves: the scrape's
        # own time, as a share of the second between two scrapes.
        median = statistics.median(scrape_times)
        print(
            f"  one scrape (under load): median {median * 1e3:.2f} ms, "
            f"max {max(scrape_times) * 1e3:.2f} ms over {len(scrape_times)} -> at most "
            f"{median * 100:.2f}% of one core at 1 scrape/s"
        )
    if results["tracing"]:
        mean_traced = statistics.fmean(results["tracing"])
        print(
            f"  --trace (all sampled):   {mean_traced:8.1f} req/s "
            f"(ratio {mean_traced / mean_without:.3f} vs --no-metrics)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
