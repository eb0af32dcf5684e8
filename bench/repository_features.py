"""Ensembles and the response cache, each against its alternative, in one run.

1. Ensemble overhead: the ``digits`` ensemble (``digits_preprocess`` then
   ``digits_classifier``) against a client that calls the two models one
   after the other itself, decoding the first answer to send the second.
2. Response cache: repeated identical requests to ``mlp`` with
   ``response_cache { enable: true }`` against the same model uncached.

Closed loop at ``--concurrency`` callers (default 16), the load generator in
its own process; the two sides of each pair are measured back to back for
``--rounds`` rounds and the medians compared, so machine noise shifts both
alike. Only the ratios mean much on a shared machine. Every cached answer is
also checked byte for byte against an uncached one. Usage:
``python bench/repository_features.py [--duration 3] [--rounds 2]``;
``make bench`` runs it after bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lockgate_client._proto import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import launch_server  # noqa: E402
from models.build import build_digits, build_mlp  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"


def build_repository(directory: Path) -> Path:
    build_digits(directory)
    build_mlp(directory)
    cached = directory / "mlp_cached"
    if not cached.exists():
        shutil.copytree(directory / "mlp", cached)
        config = cached / "config.pbtxt"
        text = config.read_text().replace('name: "mlp"', 'name: "mlp_cached"')
        config.write_text(text + "response_cache { enable: true }\n")
    return directory


def request(model: str, name: str, datatype: str, array: np.ndarray[Any, Any]) -> bytes:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype=datatype, shape=array.shape)
    message.raw_input_contents.append(array.tobytes())
    return message.SerializeToString()


def digits_pixels() -> np.ndarray[Any, Any]:
    return np.random.default_rng(1).integers(0, 256, (1, 64), dtype=np.uint8)


# --- load generator (its own process) ------------------------------------------------


async def closed_loop(url: str, mode: str, concurrency: int, duration: float) -> dict[str, Any]:
    """``concurrency`` callers for ``duration`` s after 1 s of warm-up; completed requests."""
    channel = grpc.aio.insecure_channel(url)
    call = channel.unary_unary(INFER)
    pixels = digits_pixels()
    ensemble = request("digits", "PIXELS", "UINT8", pixels)
    preprocess = request("digits_preprocess", "PIXELS", "UINT8", pixels)
    mlp = np.random.default_rng(0).random((1, 512), dtype=np.float32)
    model = {"mlp": "mlp", "mlp_cached": "mlp_cached"}.get(mode, "")
    mlp_request = request(model, "INPUT", "FP32", mlp) if model else b""
    done = 0
    start = time.perf_counter()
    measure_from, end = start + 1.0, start + 1.0 + duration

    async def one() -> None:
        if mode == "ensemble":
            await call(ensemble, timeout=60)
        elif mode == "two_calls":
            # What a client does without ensembles: decode, then send again.
            first = pb.ModelInferResponse.FromString(await call(preprocess, timeout=60))
            second = pb.ModelInferRequest(model_name="digits_classifier")
            second.inputs.add(name="SCALED", datatype="FP32", shape=first.outputs[0].shape)
            second.raw_input_contents.append(first.raw_output_contents[0])
            await call(second.SerializeToString(), timeout=60)
        else:
            await call(mlp_request, timeout=60)

    async def caller() -> None:
        nonlocal done
        while (sent := time.perf_counter()) < end:
            await one()
            if sent >= measure_from:
                done += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    await channel.close()
    return {"throughput": done / duration}


def run_load(url: str, mode: str, concurrency: int, duration: float) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--load", url, mode, str(concurrency), str(duration)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout)["throughput"])


# --- checks and report ---------------------------------------------------------------------


def check_cached_answers(url: str) -> int:
    """Every cached answer byte-equal to the uncached model's; returns how many were checked."""
    rng = np.random.default_rng(7)
    checked = 0
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(INFER)
        for _ in range(8):
            data = rng.random((1, 512), dtype=np.float32)
            plain = pb.ModelInferResponse.FromString(call(request("mlp", "INPUT", "FP32", data)))
            for _ in range(3):  # one miss, then hits
                cached = pb.ModelInferResponse.FromString(
                    call(request("mlp_cached", "INPUT", "FP32", data))
                )
                if list(cached.raw_output_contents) != list(plain.raw_output_contents):
                    raise SystemExit("a cached answer differs from the uncached one")
                checked += 1
    return checked


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        url, mode, concurrency, duration = args.load
        result = asyncio.run(closed_loop(url, mode, int(concurrency), float(duration)))
        print(json.dumps(result))
        return 0
    work = Path(tempfile.mkdtemp(prefix="lockgate-features-"))
    repository = build_repository(work / "repository")
    server = launch_server(repository, None, "--response-cache-bytes", str(64 * 2**20))
    pairs = {"ensemble": ("ensemble", "two_calls"), "cache": ("mlp_cached", "mlp")}
    samples: dict[str, list[float]] = {m: [] for pair in pairs.values() for m in pair}
    try:
        checked = check_cached_answers(server.url)
        for round_number in range(1, args.rounds + 1):
            for pair in pairs.values():
                for mode in pair:
                    rate = run_load(server.url, mode, args.concurrency, args.duration)
                    samples[mode].append(rate)
                    print(f"round {round_number} {mode}: {rate:,.0f}/s", file=sys.stderr)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    medians = {mode: statistics.median(rates) for mode, rates in samples.items()}
    print(f"\n{args.concurrency} callers, {args.rounds} rounds of {args.duration:g} s, medians")
    print(f"  digits ensemble        {medians['ensemble']:>9,.0f} req/s")
    print(f"  two calls from client  {medians['two_calls']:>9,.0f} req/s (pipelines)")
    print(f"  ensemble / two calls   {medians['ensemble'] / medians['two_calls']:>9.2f} x")
    print(f"  mlp, response cache    {medians['mlp_cached']:>9,.0f} req/s (identical requests)")
    print(f"  mlp, uncached          {medians['mlp']:>9,.0f} req/s")
    print(f"  cached / uncached      {medians['mlp_cached'] / medians['mlp']:>9.2f} x")
    print(f"  cached answers byte-equal to uncached: {checked} of {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
