"""The ``lockgate`` command: ``infer``, ``models``, ``stats`` and ``bench``, built on the SDK.

They speak only the KServe v2 gRPC protocol, so they work against any
compatible server (Triton included), not just Lockgate, and install with
``lockgate-client`` alone. Other distributions add subcommands through the
``lockgate.commands`` entry point group: the server distribution adds
``lockgate serve`` that way, so one ``lockgate`` script serves both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO, TypeAlias

import numpy as np
import numpy.typing as npt

from lockgate_client import (
    AsyncClient,
    Client,
    LockgateError,
    ModelMetadata,
    ModelStatistics,
    SharedMemoryRegion,
    SharedOutput,
    __version__,
)
from lockgate_client._loop import run
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client.datatypes import WIRE_DTYPES

__all__ = ["add_client_commands", "build_parser", "main"]

#: Entry point group through which other distributions add subcommands.
COMMANDS_GROUP = "lockgate.commands"

DEFAULT_URL = "127.0.0.1:8001"


def add_client_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``infer``, ``models``, ``stats`` and ``bench`` to the ``lockgate`` parser."""
    common = _common_options()

    infer = subparsers.add_parser(
        "infer",
        parents=[common],
        help="run one inference and print the outputs",
        description="Send one request. Each --input is NAME=FILE.npy or NAME=JSON "
        "(e.g. INPUT0='[[1,2,3]]'); values are cast to the model's datatype, and a "
        "missing batch dimension is added.",
    )
    infer.add_argument("model")
    infer.add_argument(
        "--input", "-i", action="append", required=True, metavar="NAME=VALUE", dest="inputs"
    )
    infer.add_argument("--output", "-o", action="append", metavar="NAME", dest="outputs")
    infer.add_argument("--version", default="", help="model version (default: the server's)")
    infer.set_defaults(func=run_infer)

    models = subparsers.add_parser(
        "models", parents=[common], help="list the model repository: versions, states, reasons"
    )
    models.add_argument("--ready", action="store_true", help="only models ready for inference")
    models.set_defaults(func=run_models)

    stats = subparsers.add_parser(
        "stats", parents=[common], help="a model's inference statistics (all models if none)"
    )
    stats.add_argument("model", nargs="?", default="")
    stats.add_argument("--version", default="")
    stats.set_defaults(func=run_stats)

    bench = subparsers.add_parser(
        "bench",
        parents=[common],
        help="closed-loop load test: throughput and latency per concurrency",
        description="Each of N workers sends a request as soon as its previous one "
        "returns, with random inputs shaped from the model's metadata.",
    )
    bench.add_argument("model")
    bench.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1],
        metavar="N,N,...",
        help="worker counts to measure in turn, e.g. 1,8,32 (default: 1)",
    )
    bench.add_argument(
        "--duration", type=float, default=10.0, help="seconds measured per level (default: 10)"
    )
    bench.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds per level (default: 1)"
    )
    bench.add_argument("--batch", type=int, default=1, help="rows per request (default: 1)")
    bench.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections the workers share, in turn; a server with several front-end "
        "processes (--frontends N) needs several to load them all (default: 1)",
    )
    bench.add_argument(
        "--shared-memory",
        choices=["none", "system"],
        default="none",
        help="system: each worker places its inputs and fixed-size outputs in its own "
        "POSIX shared-memory region, registered with the server (which must run on "
        "this host), as perf_analyzer --shared-memory system does (default: none)",
    )
    bench.add_argument("--version", default="")
    bench.add_argument("--json", action="store_true", help="print results as JSON")
    bench.set_defaults(func=run_bench)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--url",
        default=os.environ.get("LOCKGATE_URL", DEFAULT_URL),
        help=f"server address or gRPC target (env LOCKGATE_URL; default {DEFAULT_URL})",
    )
    group.add_argument(
        "--timeout", type=float, default=60.0, help="deadline per call, seconds (default: 60)"
    )
    group.add_argument(
        "--token",
        default=os.environ.get("LOCKGATE_TOKEN"),
        help="bearer token (env LOCKGATE_TOKEN)",
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    group.add_argument("--ca-cert", metavar="FILE", help="trust this CA (implies --tls)")
    group.add_argument("--client-cert", metavar="FILE", help="mTLS client certificate")
    group.add_argument("--client-key", metavar="FILE", help="mTLS client key")
    return common


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return values


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    tls: bool | str = args.ca_cert or bool(args.tls)
    return {
        "timeout": args.timeout,
        "token": args.token,
        "tls": tls,
        "client_cert": args.client_cert,
        "client_key": args.client_key,
    }


def _fail(error: Exception) -> int:
    print(f"lockgate: error: {error}", file=sys.stderr)
    return 1


# lockgate infer


def run_infer(args: argparse.Namespace) -> int:
    """Parse the inputs, send one request, print each output."""
    try:
        with Client(args.url, **_client_options(args)) as client:
            meta = client.metadata(args.model, args.version)
            inputs, datatypes = _parse_inputs(args.inputs, meta)
            outputs = client.infer(
                args.model, inputs, outputs=args.outputs, version=args.version, datatypes=datatypes
            )
    except (LockgateError, ValueError, TypeError, OSError) as exc:
        return _fail(exc)
    for name, array in outputs.items():
        print(f"{name}  {_datatype_of_output(meta, name)}  {list(array.shape)}")
        print(np.array2string(array, threshold=64, edgeitems=3, max_line_width=100))
    return 0


def _parse_inputs(
    specs: Sequence[str], meta: ModelMetadata
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    known = {t.name: t for t in meta.inputs}
    inputs: dict[str, npt.NDArray[Any]] = {}
    datatypes: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"--input {spec!r}: expected NAME=FILE.npy or NAME=JSON")
        array = _load_value(value)
        tensor = known.get(name)
        if tensor is not None:
            datatypes[name] = tensor.datatype
            array = _fit(name, array, tensor.datatype, list(tensor.shape))
        inputs[name] = array
    return inputs, datatypes


def _fit(name: str, array: npt.NDArray[Any], datatype: str, shape: list[int]) -> npt.NDArray[Any]:
    """Fit a value to the model's input: its datatype, and leading dimensions left out.

    Whole-valued floats become integers (``np.save(np.ones(...))`` writes
    float64); any other value that the cast would change is refused.
    """
    if datatype == "BYTES" and array.dtype.kind not in "OSU":
        array = array.astype(str)
    wire = WIRE_DTYPES[datatype] if datatype.startswith(("INT", "UINT")) else None
    if wire is not None and array.dtype.kind == "f":
        info = np.iinfo(wire.type)  # type: ignore[type-var]
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all() or (array.size and (array.min() < info.min or array.max() > info.max)):
            raise ValueError(
                f"--input {name}: {datatype} needs whole numbers from {info.min} to "
                f"{info.max}; the {array.dtype} values given are not"
            )
        array = array.astype(wire)
    # The batch dimension (-1) and fixed leading 1s, e.g. [4] for dims [1, 4].
    missing = len(shape) - array.ndim
    if missing > 0 and all(d in (-1, 1) for d in shape[:missing]):
        array = array.reshape((1,) * missing + array.shape)
    return array


def _load_value(value: str) -> npt.NDArray[Any]:
    if value.endswith(".npy"):
        return np.asarray(np.load(value, allow_pickle=False))
    try:
        return np.asarray(json.loads(value))
    except json.JSONDecodeError:
        raise ValueError(f"{value!r} is neither a .npy file nor a JSON value") from None


def _datatype_of_output(meta: ModelMetadata, name: str) -> str:
    for tensor in meta.outputs:
        if tensor.name == name:
            return tensor.datatype
    return "?"


# lockgate models


def run_models(args: argparse.Namespace) -> int:
    """Print the repository index as a table."""
    try:
        with Client(args.url, **_client_options(args)) as client:
            index = client.models(ready=args.ready)
    except LockgateError as exc:
        return _fail(exc)
    rows = [[m.name, m.version or "-", m.state or "-", m.reason] for m in index]
    _print_table(["MODEL", "VERSION", "STATE", "REASON"], rows)
    return 0


def _print_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out)


# lockgate stats


def run_stats(args: argparse.Namespace) -> int:
    """Print counts, mean durations and batch statistics of each model version."""
    try:
        with Client(args.url, **_client_options(args)) as client:
            stats = client.statistics(args.model, args.version)
    except LockgateError as exc:
        return _fail(exc)
    for i, entry in enumerate(stats):
        if i:
            print()
        _print_statistics(entry)
    return 0


def _mean_ms(duration: pb.StatisticDuration) -> str:
    return f"{duration.ns / duration.count / 1e6:.3f}" if duration.count else "-"


def _print_statistics(entry: ModelStatistics) -> None:
    s = entry.inference_stats
    last = "never"
    if entry.last_inference:
        last = datetime.fromtimestamp(entry.last_inference / 1000, UTC).isoformat(
            timespec="seconds"
        )
    print(f"{entry.name} (version {entry.version or '-'})")
    print(
        f"  inferences {entry.inference_count}  executions {entry.execution_count}  "
        f"last inference {last}"
    )
    rows = [
        ["success", str(s.success.count), _mean_ms(s.success)],
        ["fail", str(s.fail.count), _mean_ms(s.fail)],
        ["queue", str(s.queue.count), _mean_ms(s.queue)],
        ["compute input", str(s.compute_input.count), _mean_ms(s.compute_input)],
        ["compute infer", str(s.compute_infer.count), _mean_ms(s.compute_infer)],
        ["compute output", str(s.compute_output.count), _mean_ms(s.compute_output)],
    ]
    _print_table(["  REQUESTS", "COUNT", "MEAN MS"], [["  " + r[0], *r[1:]] for r in rows])
    if entry.batch_stats:
        batches = [
            [
                f"  {b.batch_size}",
                str(b.compute_infer.count),
                _mean_ms(b.compute_input),
                _mean_ms(b.compute_infer),
                _mean_ms(b.compute_output),
            ]
            for b in sorted(entry.batch_stats, key=lambda b: b.batch_size)
        ]
        _print_table(["  BATCH SIZE", "EXECUTIONS", "INPUT MS", "INFER MS", "OUTPUT MS"], batches)


# lockgate bench


@dataclass
class _Level:
    """Counters of one concurrency level while it runs."""

    concurrency: int
    measuring: bool = False
    started: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""


def run_bench(args: argparse.Namespace) -> int:
    """Run each concurrency level in turn; print a table or JSON."""
    try:
        report = _run_async(_bench(args))
    except (LockgateError, ValueError, TypeError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rows = [
            [
                str(r["concurrency"]),
                f"{r['throughput']:.1f}",
                _ms(r["p50_ms"]),
                _ms(r["p95_ms"]),
                _ms(r["p99_ms"]),
                str(r["errors"]),
            ]
            for r in report["results"]
        ]
        _print_table(["CONCURRENCY", "INFER/S", "P50 MS", "P95 MS", "P99 MS", "ERRORS"], rows)
    for r in report["results"]:
        if r["last_error"]:
            print(f"concurrency {r['concurrency']}: last error: {r['last_error']}", file=sys.stderr)
    return 0 if all(r["requests"] for r in report["results"]) else 1


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _run_async(coroutine: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    # uvloop (a server dependency) lets one client process push far more load.
    return run(coroutine)


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch < 1 or args.duration <= 0 or args.warmup < 0:
        raise ValueError("--batch must be >= 1, --duration > 0 and --warmup >= 0")
    options = _client_options(args) | {"retries": 0, "connections": args.connections}
    async with AsyncClient(args.url, **options) as client:
        meta = await client.metadata(args.model, args.version)
        batched = await _batches(client, args.model, args.version, meta)
        rows = args.batch if batched else 1
        if args.batch > 1 and not batched:
            print(f"note: {args.model} does not batch; sending 1 row", file=sys.stderr)
        inputs, datatypes = random_inputs(meta, rows, batched, np.random.default_rng(0))
        requests = [_Request(inputs, None)]
        regions: list[SharedMemoryRegion] = []
        try:
            if args.shared_memory == "system":
                for index in range(max(args.concurrency)):
                    region, request = await _shared_request(
                        client, meta, inputs, datatypes, rows, batched, index
                    )
                    regions.append(region)
                    requests.append(request)
                del requests[0]
            results = []
            for concurrency in args.concurrency:
                level = _Level(concurrency)
                await _run_level(client, args, level, requests, datatypes)
                results.append(_summary(level, args.duration, rows))
        finally:
            for region in regions:
                await client.unregister_shared_memory(region)
                region.close()
    return {
        "model": args.model,
        "version": args.version,
        "batch": rows,
        "shared_memory": args.shared_memory,
        "duration": args.duration,
        "results": results,
    }


@dataclass
class _Request:
    """What one worker sends: arrays, or references into its region."""

    inputs: dict[str, Any]
    outputs: dict[str, SharedOutput | None] | None


async def _shared_request(
    client: AsyncClient,
    meta: ModelMetadata,
    inputs: dict[str, npt.NDArray[Any]],
    datatypes: dict[str, str],
    rows: int,
    batched: bool,
    index: int,
) -> tuple[SharedMemoryRegion, _Request]:
    """A region for one worker holding its inputs, and room for its fixed-size outputs.

    Outputs of unknown size (a variable dimension, BYTES) come back inline.
    """
    sizes: dict[str, int | None] = {}
    for tensor in meta.outputs:
        shape = list(tensor.shape)
        if batched and shape:
            shape[0] = rows
        known = all(d >= 0 for d in shape) and tensor.datatype in WIRE_DTYPES
        fixed = known and tensor.datatype != "BYTES"
        sizes[tensor.name] = (
            math.prod(shape) * WIRE_DTYPES[tensor.datatype].itemsize if fixed else None
        )
    # Serialized BYTES inputs are a little larger than their text: room to spare.
    room = sum(a.nbytes + 4 * a.size + 64 for a in inputs.values())
    room += sum(size + 64 for size in sizes.values() if size is not None)
    region = await client.create_shared_memory(f"lockgate_bench_{os.getpid()}_{index}", room)
    placed = {name: region.write(array, datatype=datatypes[name]) for name, array in inputs.items()}
    outputs = {name: None if size is None else region.output(size) for name, size in sizes.items()}
    return region, _Request(placed, outputs)


async def _batches(client: AsyncClient, model: str, version: str, meta: ModelMetadata) -> bool:
    """Whether the first dimension is the batch: from the config, else the metadata."""
    try:
        return (await client.config(model, version)).max_batch_size > 0
    except LockgateError:
        # ModelConfig is Triton's extension; plain KServe servers lack it.
        return all(t.shape and t.shape[0] == -1 for t in meta.inputs)


def random_inputs(
    meta: ModelMetadata, batch: int, batched: bool, rng: np.random.Generator
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    """Random inputs for ``meta``: batch dimension ``batch``, other -1 dims 1."""
    inputs: dict[str, npt.NDArray[Any]] = {}
    datatypes: dict[str, str] = {}
    for tensor in meta.inputs:
        shape = list(tensor.shape)
        if batched and shape:
            shape[0] = batch
        shape = [1 if d < 0 else d for d in shape]
        inputs[tensor.name] = _random_array(tensor.datatype, shape, rng)
        datatypes[tensor.name] = tensor.datatype
    return inputs, datatypes


def _random_array(datatype: str, shape: list[int], rng: np.random.Generator) -> npt.NDArray[Any]:
    if datatype == "BYTES":
        # Decimal strings: valid for string models that parse numbers, too.
        digits = rng.integers(0, 100, shape)
        strings = np.empty(digits.shape, dtype=np.object_)
        strings.reshape(-1)[:] = [str(v).encode() for v in digits.reshape(-1)]
        return strings
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        dtype = {"FP16": np.float16, "FP64": np.float64}.get(datatype, np.float32)
        return rng.random(shape).astype(dtype)
    # Small non-negative values: safe for every integer type and for indices.
    return rng.integers(0, 4, shape).astype(WIRE_DTYPES[datatype])


async def _run_level(
    client: AsyncClient,
    args: argparse.Namespace,
    level: _Level,
    requests: list[_Request],
    datatypes: dict[str, str],
) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + args.warmup + args.duration

    async def worker(request: _Request) -> None:
        while loop.time() < end:
            sent = time.perf_counter()
            try:
                await client.infer(
                    args.model,
                    request.inputs,
                    outputs=request.outputs,
                    version=args.version,
                    datatypes=datatypes,
                )
            except LockgateError as exc:
                if level.measuring:
                    level.errors += 1
                    level.last_error = str(exc)
                # Do not spin on a server that fails fast.
                await asyncio.sleep(0.01)
                continue
            done = time.perf_counter()
            if level.measuring and loop.time() <= end:
                level.latencies.append(done - sent)

    async def measure() -> None:
        await asyncio.sleep(args.warmup)
        level.measuring = True
        level.started = time.perf_counter()
        while loop.time() < end:
            _progress(level, args.duration)
            await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))
        _progress(level, args.duration)
        print(file=sys.stderr)

    # Shared memory: a region per worker, so no two requests write the same bytes.
    mine = [requests[i % len(requests)] for i in range(level.concurrency)]
    await asyncio.gather(measure(), *(worker(request) for request in mine))


def _progress(level: _Level, duration: float) -> None:
    elapsed = time.perf_counter() - level.started if level.measuring else 0.0
    rate = len(level.latencies) / elapsed if elapsed > 0 else 0.0
    sys.stderr.write(
        f"\rconcurrency {level.concurrency}: {min(elapsed, duration):5.1f}/{duration:g} s  "
        f"{rate:9.1f} req/s  errors {level.errors}   "
    )
    sys.stderr.flush()


def _summary(level: _Level, duration: float, rows: int) -> dict[str, Any]:
    count = len(level.latencies)
    result: dict[str, Any] = {
        "concurrency": level.concurrency,
        "requests": count,
        "errors": level.errors,
        "requests_per_second": count / duration,
        "throughput": count * rows / duration,
        "mean_ms": None,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "last_error": level.last_error,
    }
    if count:
        ms = np.array(level.latencies) * 1000
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        result |= {
            "mean_ms": float(ms.mean()),
            "p50_ms": float(p50),
            "p95_ms": float(p95),
            "p99_ms": float(p99),
        }
    return result


# --- the `lockgate` script -------------------------------------------------------------


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
AddCommand: TypeAlias = "Callable[[Subparsers], None]"


def build_parser(*extra: AddCommand) -> argparse.ArgumentParser:
    """The ``lockgate`` parser: the client commands, those of installed plugins, ``extra``.

    A plugin is an entry point in the ``lockgate.commands`` group naming a
    function that adds its subcommand(s) to the subparsers (the server's
    ``serve``). One that fails to import is left out, so a broken server
    install never takes the client commands down with it.
    """
    parser = argparse.ArgumentParser(
        prog="lockgate",
        description="Lockgate: a Triton-compatible gRPC model server for ONNX models, "
        "and a client for any KServe v2 server.",
    )
    parser.add_argument("--version", action="version", version=f"lockgate {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (*_plugins(), *extra):
        if add.__name__ == "add_client_commands" or _added(subparsers, add):
            continue
        add(subparsers)
    add_client_commands(subparsers)
    return parser


def _plugins() -> list[AddCommand]:
    from importlib.metadata import entry_points

    found: list[AddCommand] = []
    for entry in entry_points(group=COMMANDS_GROUP):
        try:
            found.append(entry.load())
        except Exception as exc:  # a broken plugin must not break the client commands
            print(f"lockgate: ignoring command plugin {entry.value}: {exc}", file=sys.stderr)
    return found


def _added(subparsers: Subparsers, add: AddCommand) -> bool:
    # The same function from an entry point and from ``extra``: add it once.
    added: set[AddCommand] = getattr(subparsers, "_lockgate_added", set())
    seen = add in added
    added.add(add)
    subparsers._lockgate_added = added  # type: ignore[attr-defined]
    return seen


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lockgate COMMAND ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
