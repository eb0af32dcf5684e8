"""``make gpu-check``: prove Lockgate's CUDA path in one run on a GPU host.

Made for short-lived GPU hosts without network: it installs what it needs from
a directory of wheels (``--wheels DIR``, split wheels reassembled), says what
it found (driver, CUDA, cuDNN, GPU, ONNX Runtime), then

1. proves the CUDA provider is used: each session's providers, and a profile
   showing where the kernels ran;
2. compares every example model's outputs served by Lockgate on the GPU with
   ONNX Runtime on the CPU (tolerances by datatype);
3. measures in-process ONNX Runtime (IO binding) against Lockgate end to end
   for the MLP and the ResNet-50-shaped model: batch 1-64 in process, 1-256
   callers to Lockgate, with and without dynamic batching, 1 and 2 instances;
4. checks the ``nv_gpu_*`` metrics on /metrics against ``nvidia-smi``;
5. loads and unloads a model 20 times and checks GPU memory returns to its
   baseline;
6. writes ``gpu_check.json`` and ``gpu_check.md`` and exits 1 if any check failed.

``--device cpu`` is the dry run: every step runs on the CPU provider (GPU-only
checks are reported as skipped), so the script itself is tested where there
is no GPU. ``--quick`` shrinks it to seconds (the test suite's smoke test).

Usage::

    python bench/gpu_check.py --wheels /data/wheels            # on the GPU host
    python bench/gpu_check.py --device cpu [--quick]           # dry run anywhere
    python bench/gpu_check.py --requirements                   # what --wheels must hold
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "server", ROOT / "client"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

#: Set in the environment of the re-executed script, so it re-executes once.
PREPARED = "LOCKGATE_GPU_CHECK_PREPARED"
#: Wall-clock start of the first process, inherited by the re-executed one.
STARTED = "LOCKGATE_GPU_CHECK_STARTED"
#: A piece of a split wheel: the wheel's name, then its index.
PART = re.compile(r"^(?P<wheel>.+\.whl)\.(?:part)?[-_.]?(?P<index>\d+|[a-z]{2})$")
INFER = "/inference.GRPCInferenceService/ModelInfer"
#: Example models compared in step 2 (the GPU ones join with --quick off).
EXAMPLES = ["simple", "simple_string", "mlp", "image_classifier"]
GPU_MODELS = ["resnet50", "resnet50_fp16"]
#: (rtol, atol) by datatype: GPU kernels sum in other orders (and FP32
#: convolutions may use TF32), so floats agree only approximately.
TOLERANCES = {"FP32": (1e-2, 1e-4), "FP16": (5e-2, 1e-3), "FP64": (1e-6, 1e-9)}


# --- offline install ---------------------------------------------------------------


def reassemble(source: Path, into: Path) -> list[Path]:
    """Whole wheels from ``source`` in ``into``: ``NAME.whl.part-*`` concatenated in order.

    Parts are named ``NAME.whl.part-00``, ``NAME.whl.part-aa`` (what ``split``
    makes), ``NAME.whl.part1`` or ``NAME.whl.001``; each
    reassembled wheel is checked as a zip (every member's CRC), so a missing
    or truncated part fails here with its name, not later inside pip.
    """
    into.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for path in source.iterdir():
        if match := PART.match(path.name):
            groups[match["wheel"]].append((match["index"], path))
    wheels = []
    for name, parts in sorted(groups.items()):
        target = into / name
        with target.open("wb") as out:
            # Shortest first, then by name: 2 before 10, -09 before -10, aa before ab.
            for _, part in sorted(parts, key=lambda p: (len(p[0]), p[0])):
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 16 * 2**20)
        wheels.append(target)
    for wheel in source.glob("*.whl"):
        link = into / wheel.name
        if not link.exists():
            link.symlink_to(wheel.resolve())
        wheels.append(link)
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as archive:
                bad = archive.testzip()
        except zipfile.BadZipFile as exc:
            raise SystemExit(
                f"{wheel.name}: not a whole wheel ({exc}); is a part missing?"
            ) from None
        if bad is not None:
            raise SystemExit(f"{wheel.name}: member {bad} is corrupt; is a part missing?")
    return wheels


def requirements() -> list[str]:
    """What Lockgate needs at run time (pip evaluates the markers), plus onnx for models."""
    import tomllib

    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    wanted = [r for r in server if not r.startswith("lockgate-client")]
    return [*wanted, *client.get("dependencies", []), "onnx"]


def install(wheels: Path, venv: Path) -> Path:
    """A venv that sees the host's packages (torch, nvidia-*) with the wheels installed.

    The venv's own site-packages come first on sys.path, so onnxruntime-gpu
    installed there wins over a CPU onnxruntime the host already has.
    """
    started = time.monotonic()
    found = reassemble(wheels, venv / "wheels")
    print(f"wheels: {len(found)} in {wheels} ({', '.join(w.name for w in found)})")
    python = venv / "bin" / "python"
    if not python.exists():
        make = [sys.executable, "-m", "venv", "--system-site-packages", str(venv)]
        if subprocess.run(make, check=False).returncode != 0:
            # Distributions that split out ensurepip (Debian's python3-venv):
            # the venv sees the host's pip through --system-site-packages.
            shutil.rmtree(venv / "bin", ignore_errors=True)
            subprocess.run([*make, "--without-pip"], check=True)
    wanted = ["onnxruntime-gpu", *requirements()]
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(venv / "wheels"),
            "--disable-pip-version-check",
            *wanted,
        ],
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(
            "pip could not install everything offline; add the missing wheels to "
            f"{wheels} (see docs/deploy.md, 'GPU check')"
        )
    print(f"installed into {venv} in {time.monotonic() - started:.0f} s")
    return python


def library_dirs(python: str) -> list[str]:
    """The lib/ folders of the nvidia-* wheels (CUDA, cuDNN, cuBLAS) that ``python`` sees."""
    code = (
        "import glob, site, sys; "
        "roots = site.getsitepackages() + [site.getusersitepackages()]; "
        "print('\\n'.join(sorted({d for r in roots for d in glob.glob(r + '/nvidia/*/lib')})))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return [line for line in out.stdout.splitlines() if line]


def reexec(python: str, argv: list[str]) -> None:
    """Run this script again under ``python`` with the nvidia-* libraries findable.

    The dynamic loader reads LD_LIBRARY_PATH only at process start, and the
    servers started later inherit it: CUDA libraries from pip wheels are then
    found by every process without touching the system.
    """
    env = dict(os.environ)
    dirs = library_dirs(python)
    env["LD_LIBRARY_PATH"] = ":".join([*dirs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PYTHONPATH"] = ":".join(
        [str(ROOT / "server"), str(ROOT / "client"), str(ROOT), env.get("PYTHONPATH", "")]
    ).rstrip(":")
    env[PREPARED] = "1"
    sys.stdout.flush()
    os.execve(python, [python, str(Path(__file__).resolve()), *argv], env)


# --- what the host has -------------------------------------------------------------


def host_report() -> dict[str, Any]:
    """Driver, CUDA, cuDNN, GPUs and ONNX Runtime as this process finds them."""
    import onnxruntime as ort

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_path": str(Path(ort.__file__).parent),
        "providers": ort.get_available_providers(),
        "cpus": os.cpu_count(),
        "driver": None,
        "cuda_driver": None,
        "cudnn": None,
        "gpus": [],
    }
    try:
        pynvml: Any = importlib.import_module("pynvml")
        pynvml.nvmlInit()
        report["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        report["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            report["gpus"].append(
                {
                    "name": _text(pynvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                    "memory_total_bytes": int(memory.total),
                }
            )
    except Exception as exc:  # no pynvml, no driver, no GPU: all mean "none found"
        report["nvml_error"] = str(exc)
    for name in ("libcudnn.so.9", "libcudnn.so"):
        try:
            version = int(ctypes.CDLL(name).cudnnGetVersion())
        except (OSError, AttributeError):
            continue
        report["cudnn"] = f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
        break
    return report


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- results -----------------------------------------------------------------------


@dataclass
class Check:
    """One verdict: ok True/False, or None when skipped (and why, in detail)."""

    step: str
    name: str
    ok: bool | None
    detail: str


@dataclass
class Context:
    device: str
    quick: bool
    repository: Path
    out: Path
    duration: float
    cycles: int
    #: time.monotonic() by which the run must be done (the host's budget).
    deadline: float
    host: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def short_of_time(self, reserve: float) -> bool:
        """Less than ``reserve`` seconds are left before the deadline."""
        return time.monotonic() > self.deadline - reserve

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"

    @property
    def perf_models(self) -> list[str]:
        return ["mlp"] if self.quick else ["mlp", "resnet50"]

    @property
    def compared(self) -> list[str]:
        quick = ["simple", "simple_string", "mlp", "mlp_cuda_graph"]
        return quick if self.quick else [*EXAMPLES, "mlp_cuda_graph", *GPU_MODELS]

    def check(self, step: str, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(step, name, ok, detail))
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[ok]
        print(f"  [{mark}] {name}: {detail}", flush=True)

    def gpu_only(self, step: str, name: str) -> bool:
        """True on a GPU run; on the dry run records the check as skipped."""
        if self.device == "cuda":
            return True
        self.check(step, name, None, "GPU only (dry run on the CPU)")
        return False


# --- models and sessions ----------------------------------------------------------------


def build_repository(ctx: Context) -> None:
    """The example (and GPU) models, plus twins without batching and with 2 instances."""
    from models import build

    builders = [*build.EXAMPLE_BUILDERS, *(() if ctx.quick else build.GPU_BUILDERS)]
    for builder in builders:
        builder(ctx.repository)
    for name in ctx.perf_models:
        twin(ctx.repository, name, "_x2", batching=True, count=2)
        twin(ctx.repository, name, "_nobatch", batching=False, count=1)
        twin(ctx.repository, name, "_nobatch_x2", batching=False, count=2)
    # CUDA graphs (fixed device buffers per batch size) on the GPU; on the CPU
    # the option is logged as unused and the model runs as usual.
    graph = twin(ctx.repository, "mlp", "_cuda_graph", batching=True, count=1)
    graph.parameters["enable_cuda_graph"].string_value = "1"
    write_config(ctx.repository, graph)


def twin(repo: Path, name: str, suffix: str, *, batching: bool, count: int) -> Any:
    """A copy of model ``name`` (its ONNX file linked) with another config; returns it."""
    from google.protobuf import text_format

    from lockgate_client._proto import model_config_pb2 as mc

    config = mc.ModelConfig()
    text_format.Parse((repo / name / "config.pbtxt").read_text(), config)
    config.name = name + suffix
    if not batching:
        config.ClearField("dynamic_batching")
    del config.instance_group[:]
    config.instance_group.add(count=count)
    write_config(repo, config)
    link = repo / config.name / "1" / "model.onnx"
    if not link.exists():
        link.symlink_to((repo / name / "1" / "model.onnx").resolve())
    return config


def write_config(repo: Path, config: Any) -> None:
    from google.protobuf import text_format

    (repo / config.name / "1").mkdir(parents=True, exist_ok=True)
    (repo / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))


def variants(model: str) -> dict[str, str]:
    """Label -> served model name for the four serving variants of ``model``."""
    return {
        "batched, 1 instance": model,
        "batched, 2 instances": f"{model}_x2",
        "unbatched, 1 instance": f"{model}_nobatch",
        "unbatched, 2 instances": f"{model}_nobatch_x2",
    }


def session(ctx: Context, model: str, device: str, profile: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # As the server sets it: spinning threads would take the cores from the load generator.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        # As models/build.py configures the ResNet for Lockgate: the same for both sides.
        cuda = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
        providers.insert(0, ("CUDAExecutionProvider", cuda))
    path = ctx.repository / model / "1" / "model.onnx"
    return ort.InferenceSession(str(path), options, providers=providers)


NUMPY_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(string)": "object",
}


def random_feeds(sess: Any, rows: int, seed: int = 0) -> dict[str, Any]:
    """Inputs for ``sess`` with ``rows`` rows: floats in [0, 1), small integers, digit strings."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for node in sess.get_inputs():
        shape = [rows if not isinstance(d, int) else d for d in node.shape]
        dtype = NUMPY_TYPES[node.type]
        if dtype == "object":
            feeds[node.name] = rng.integers(0, 100, shape).astype(str).astype(object)
        elif dtype.startswith("float"):
            feeds[node.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[node.name] = rng.integers(0, 100, shape).astype(dtype)
    return feeds


# --- step 1: providers and profile ---------------------------------------------------


def kernel_time_by_provider(profile: str) -> dict[str, float]:
    """Microseconds of node kernels per execution provider, from ORT's profile JSON."""
    totals: dict[str, float] = defaultdict(float)
    for event in json.loads(Path(profile).read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[args.get("provider", "?")] += float(event.get("dur", 0))
    return dict(totals)


def step_providers(ctx: Context) -> None:
    print("step 1: is the CUDA provider really used?", flush=True)
    results = {}
    # The CUDA-graph twin is the same file as the MLP: it differs only when served.
    for model in [m for m in ctx.compared if not m.endswith("_cuda_graph")]:
        sess = session(ctx, model, ctx.device, profile=ctx.out / f"profile-{model}")
        feeds = random_feeds(sess, 4)
        for _ in range(3):
            sess.run(None, feeds)
        times = kernel_time_by_provider(sess.end_profiling())
        total = sum(times.values()) or 1.0
        share = times.get(ctx.provider, 0.0) / total
        providers = sess.get_providers()
        results[model] = {"providers": providers, "kernel_us": times, "share": share}
        ctx.check(
            "1",
            f"{model}: session providers",
            providers[0] == ctx.provider,
            ", ".join(providers),
        )
        # String casts have no CUDA kernels; every other model must compute on the device.
        if model != "simple_string":
            ctx.check(
                "1",
                f"{model}: kernel time on {ctx.provider}",
                share >= 0.9,
                f"{share:.0%} of {total:.0f} µs ("
                + ", ".join(f"{p} {t:.0f} µs" for p, t in sorted(times.items()))
                + ")",
            )
    ctx.data["providers"] = results


# --- step 2: outputs against the CPU ---------------------------------------------------


def step_outputs(ctx: Context, url: str, log: str) -> None:
    import numpy as np

    from lockgate_client import Client

    print("step 2: outputs served on the device vs ONNX Runtime on the CPU", flush=True)
    label = "gpu0" if ctx.device == "cuda" else "cpu"
    placed = re.findall(r"loaded model (\S+) version \S+: \d+ instance\(s\) on (\S+),", log)
    where = dict(placed)
    with Client(url, timeout=120) as client:
        for model in ctx.compared:
            ctx.check(
                "2", f"{model}: served on {label}", where.get(model) == label, where.get(model, "?")
            )
            cpu = session(ctx, model, "cpu")
            feeds = random_feeds(cpu, 4, seed=2)
            expected = dict(
                zip([o.name for o in cpu.get_outputs()], cpu.run(None, feeds), strict=False)
            )
            served = client.infer(model, feeds)
            for name, want in expected.items():
                got = served[name]
                if want.dtype == object:
                    texts = [v.decode() if isinstance(v, bytes) else str(v) for v in got.ravel()]
                    ok = texts == [str(v) for v in want.ravel()]
                    detail = "exact" if ok else "differs"
                else:
                    wire = {"float32": "FP32", "float16": "FP16", "float64": "FP64"}
                    rtol, atol = TOLERANCES.get(wire.get(str(want.dtype), ""), (0.0, 0.0))
                    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
                    ok = got.shape == want.shape and bool(
                        np.all(diff <= atol + rtol * np.abs(want.astype(np.float64)))
                    )
                    detail = f"max |diff| {diff.max():.3g} (rtol {rtol:g}, atol {atol:g})"
                ctx.check("2", f"{model}.{name}", ok, detail)


# --- step 3: performance ----------------------------------------------------------------


def request_bytes(ctx: Context, model: str) -> bytes:
    """One serialized ModelInferRequest of one row for ``model``."""
    import numpy as np

    from lockgate_client._proto import grpc_service_pb2 as pb

    sess = session(ctx, model, "cpu")
    request = pb.ModelInferRequest(model_name=model)
    wire = {"float32": "FP32", "float16": "FP16", "int32": "INT32"}
    for name, value in random_feeds(sess, 1).items():
        array = np.ascontiguousarray(value)
        request.inputs.add(name=name, datatype=wire[str(array.dtype)], shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request.SerializeToString()


def run_load(port: int, payload: bytes, concurrency: int, duration: float) -> dict[str, Any]:
    """Closed-loop load from a separate process (so it does not share our GIL)."""
    from bench.serving import spawn_load

    return spawn_load(__file__, port, payload, concurrency, duration)


def load_main(port: int, payload_file: str, concurrency: int, duration: float) -> None:
    # make bench's load generator; imported by name because grpc-stubs has no
    # grpc.aio, and the type-checked tree (which imports this file) must not follow it.
    bench_run: Any = importlib.import_module("bench.run")
    from lockgate_client._loop import run

    payload = Path(payload_file).read_bytes()
    raw = run(bench_run.closed_loop(port, payload, concurrency, duration, warmup=0.5))
    latencies = sorted(raw["latencies"])

    def percentile(q: float) -> float:
        return float(latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]) * 1e3

    print(
        json.dumps(
            {
                "throughput": len(latencies) / raw["duration"],
                "errors": raw["errors"],
                "p50_ms": percentile(0.5) if latencies else 0.0,
                "p99_ms": percentile(0.99) if latencies else 0.0,
            }
        )
    )


def counts(url: str, model: str) -> tuple[int, int]:
    from lockgate_client import Client

    with Client(url) as client:
        stats = client.statistics(model)[0]
    return stats.inference_count, stats.execution_count


def in_process(
    ctx: Context, model: str, batch: int, seconds: float, *, binding: bool = True
) -> float:
    """Rows per second of ONNX Runtime in this process (IO binding, or plain run)."""
    from lockgate.binding import BoundRunner

    key = (model, batch, binding)
    cache = ctx.data.setdefault("_in_process", {})
    if key in cache:
        return float(cache[key])
    sess = session(ctx, model, ctx.device)
    feeds = random_feeds(sess, batch)
    call: Callable[[], object] = (
        functools.partial(BoundRunner(sess).run, feeds)
        if binding
        else functools.partial(sess.run, None, feeds)
    )
    call()
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        call()
        runs += 1
    cache[key] = runs * batch / elapsed
    return float(cache[key])


def step_performance(ctx: Context, server: Any) -> None:
    print("step 3: in-process ONNX Runtime vs Lockgate end to end", flush=True)
    batches, callers = [1, 8, 32, 64], [1, 16, 64, 256]
    if ctx.device == "cpu":
        # ResNet-50 at batch 64 or 256 callers takes minutes a point on a CPU.
        batches, callers = [1, 8], [1, 8]
    if ctx.quick:
        batches, callers = [1, 4], [4]
    rows: list[dict[str, Any]] = []
    for model in ctx.perf_models:
        for batch in batches:
            rate = in_process(ctx, model, batch, ctx.duration / 2)
            # The same without IO binding: does binding pay on this device?
            plain = in_process(ctx, model, batch, ctx.duration / 2, binding=False)
            print(
                f"  in-process {model} batch {batch}: {rate:,.0f} rows/s with IO binding, "
                f"{plain:,.0f} without ({rate / plain:.2f}×)",
                flush=True,
            )
            rows.append({"model": model, "target": "in-process", "batch": batch, "rows_s": rate})
            unbound = "in-process, no IO binding"
            rows.append({"model": model, "target": unbound, "batch": batch, "rows_s": plain})
        payload = {m: request_bytes(ctx, m) for m in variants(model).values()}
        for label, served in variants(model).items():
            for concurrency in callers:
                # Steps 4 and 5 need about a minute and a half on a GPU host.
                if ctx.short_of_time(90):
                    what = f"{model} {label}, {concurrency} callers"
                    ctx.check("3", what, None, "not measured: the time budget ran short")
                    continue
                before = counts(server.url, served)
                result = run_load(server.grpc_port, payload[served], concurrency, ctx.duration)
                after = counts(server.url, served)
                executions = after[1] - before[1]
                mean_batch = (after[0] - before[0]) / executions if executions else 0.0
                row = {
                    "model": model,
                    "target": label,
                    "callers": concurrency,
                    "rows_s": result["throughput"],
                    "p50_ms": result["p50_ms"],
                    "p99_ms": result["p99_ms"],
                    "errors": result["errors"],
                    "mean_batch": mean_batch,
                }
                if label.startswith("batched") and mean_batch >= 1:
                    same = max(1, round(mean_batch))
                    row["in_process_rows_s"] = in_process(ctx, model, same, ctx.duration / 2)
                    row["vs_in_process"] = row["rows_s"] / row["in_process_rows_s"]
                rows.append(row)
                print(
                    f"  {model} {label}, {concurrency} callers: {row['rows_s']:,.0f} rows/s, "
                    f"p50 {row['p50_ms']:.1f} ms, batch {mean_batch:.1f}"
                    + (
                        f", {row['vs_in_process']:.2f} × in-process"
                        if "vs_in_process" in row
                        else ""
                    )
                    + (f", {row['errors']} errors" if row["errors"] else ""),
                    flush=True,
                )
    ctx.data["performance"] = rows
    errors = sum(r.get("errors", 0) for r in rows)
    ctx.check("3", "no failed requests under load", errors == 0, f"{errors} errors")
    performance_targets(ctx, rows, max(callers))


def performance_targets(ctx: Context, rows: list[dict[str, Any]], most: int) -> None:
    def best(model: str, prefix: str, callers: int) -> dict[str, Any] | None:
        found = [
            r
            for r in rows
            if r["model"] == model
            and r["target"].startswith(prefix)
            and r.get("callers") == callers
        ]
        return max(found, key=lambda r: r["rows_s"], default=None)

    name = "resnet50 batched ≥ 0.8 × in-process"
    if "resnet50" in ctx.perf_models and ctx.gpu_only("3", name):
        row = best("resnet50", "batched", most)
        if row is None or "vs_in_process" not in row:
            ctx.check("3", name, None, f"not measured at {most} callers")
        else:
            ratio = row["vs_in_process"]
            detail = f"{ratio:.2f} at {most} callers ({row['target']})"
            ctx.check("3", name, ratio >= 0.8, detail)
    name = f"mlp batched ≥ 5 × unbatched at {most} callers"
    if ctx.gpu_only("3", name):
        batched = best("mlp", "batched, 1", most)
        unbatched = best("mlp", "unbatched, 1", most)
        if batched is None or unbatched is None or not unbatched["rows_s"]:
            ctx.check("3", name, None, "not measured")
        else:
            ratio = batched["rows_s"] / unbatched["rows_s"]
            ctx.check("3", name, ratio >= 5, f"{ratio:.1f}×")


# --- step 4: GPU metrics -----------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric, gpu_uuid) -> value for the nv_gpu_* series on /metrics."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for match in re.finditer(r'^(nv_gpu_\w+)\{gpu_uuid="([^"]+)"\} (\S+)$', text, re.M):
        values[(match[1], match[2])] = float(match[3])
    return values


def nvidia_smi() -> dict[str, dict[str, float]]:
    fields = "uuid,utilization.gpu,memory.used,memory.total,power.draw"
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    readings = {}
    for line in out.strip().splitlines():
        uuid, util, used, total, power = (part.strip() for part in line.split(","))
        readings[uuid] = {
            "utilization": float(util) / 100,
            "memory_used_bytes": float(used) * 2**20,
            "memory_total_bytes": float(total) * 2**20,
            "power_usage": float(power) if power not in ("[N/A]", "N/A") else -1.0,
        }
    return readings


def step_metrics(ctx: Context, server: Any) -> None:
    print("step 4: nv_gpu_* on /metrics vs nvidia-smi", flush=True)
    if ctx.device == "cpu":
        series = scrape(server.metrics_url)
        ctx.check("4", "no GPU series without a GPU", not series, f"{len(series)} nv_gpu_* series")
        ctx.gpu_only("4", "metrics match nvidia-smi")
        return
    model = ctx.perf_models[-1]
    # Compare under load, so utilization and power are not all idle zeros.
    with background_load(server.grpc_port, request_bytes(ctx, model), 64, 4.0):
        time.sleep(2.0)
        ours = scrape(server.metrics_url)
        theirs = nvidia_smi()
    ctx.data["metrics"] = {"lockgate": {f"{k[0]}:{k[1]}": v for k, v in ours.items()}}
    ctx.data["metrics"]["nvidia_smi"] = theirs
    for uuid, smi in theirs.items():
        total = smi["memory_total_bytes"]
        pairs = [
            ("nv_gpu_memory_total_bytes", "memory_total_bytes", 0.01 * total),
            ("nv_gpu_memory_used_bytes", "memory_used_bytes", max(0.05 * total, 2**30)),
            ("nv_gpu_utilization", "utilization", 0.3),
            ("nv_gpu_power_usage", "power_usage", max(0.25 * smi["power_usage"], 50.0)),
        ]
        for metric, key, tolerance in pairs:
            value = ours.get((metric, uuid))
            if key == "power_usage" and smi[key] < 0:
                ctx.check("4", f"{metric} {uuid[:12]}", None, "nvidia-smi has no power reading")
                continue
            ok = value is not None and abs(value - smi[key]) <= tolerance
            ctx.check(
                "4",
                f"{metric} {uuid[:12]}",
                ok,
                f"lockgate {value}, nvidia-smi {smi[key]:.4g} (± {tolerance:.3g})",
            )


@contextmanager
def background_load(port: int, payload: bytes, callers: int, seconds: float) -> Iterator[None]:
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as handle:
        handle.write(payload)
    process = subprocess.Popen(
        [sys.executable, __file__, "--load", str(port), handle.name, str(callers), str(seconds)],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.wait()
        os.unlink(handle.name)


# --- step 5: load and unload -------------------------------------------------------------


def device_memory(pid: int, device: str) -> float:
    """Bytes: GPU 0's used memory on a GPU run, the server's RSS on the dry run."""
    if device == "cuda":
        pynvml: Any = importlib.import_module("pynvml")
        pynvml.nvmlInit()
        return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return float(match[1]) * 1024 if match else 0.0


def step_load_unload(ctx: Context) -> None:
    from bench.serving import launch_server
    from lockgate_client import Client

    model = "mlp" if ctx.quick else "resnet50"
    print(f"step 5: load and unload {model} {ctx.cycles} times", flush=True)
    server = launch_server(
        ctx.repository, ctx.out, "--model-control-mode", "explicit", "--no-metrics"
    )
    try:
        readings = []
        with Client(server.url, timeout=120) as client:
            feeds = random_feeds(session(ctx, model, "cpu"), 8)
            for cycle in range(ctx.cycles + 1):
                if cycle > 2 and ctx.short_of_time(10):
                    print(f"  time budget: stopping after {cycle - 1} cycles", flush=True)
                    break
                client.load(model)
                client.infer(model, feeds)
                client.unload(model)
                time.sleep(0.2)  # the unload finishes after its reply
                readings.append(device_memory(server.process.pid, ctx.device))
    finally:
        server.stop()
    # The first cycle creates the CUDA context and ONNX Runtime's lasting
    # allocations; from then on every unload must come back to that level.
    baseline, after = readings[0], readings[1:]
    growth = max(after) - baseline
    allowed = 64 * 2**20 if ctx.device == "cuda" else 256 * 2**20
    what = "GPU memory used" if ctx.device == "cuda" else "server RSS"
    ctx.data["load_unload"] = {"what": what, "bytes_after_each_unload": readings}
    ctx.check(
        "5",
        f"{what} back to baseline after {len(after)} unloads",
        growth <= allowed,
        f"baseline {baseline / 2**20:.0f} MiB, highest after {max(after) / 2**20:.0f} MiB, "
        f"last {after[-1] / 2**20:.0f} MiB (allowed +{allowed / 2**20:.0f} MiB)",
    )


# --- step 6: the report ------------------------------------------------------------------


def write_report(ctx: Context, host: dict[str, Any], seconds: float) -> tuple[Path, Path]:
    failed = [c for c in ctx.checks if c.ok is False]
    data = {
        "device": ctx.device,
        "quick": ctx.quick,
        "seconds": round(seconds, 1),
        "passed": not failed,
        "host": host,
        "checks": [asdict(c) for c in ctx.checks],
        **{k: v for k, v in ctx.data.items() if not k.startswith("_")},
    }
    json_path = ctx.out / "gpu_check.json"
    json_path.write_text(json.dumps(data, indent=2, default=str))
    lines = [
        f"# Lockgate GPU check ({ctx.device}{', quick' if ctx.quick else ''})",
        "",
        f"{'PASSED' if not failed else f'FAILED: {len(failed)} check(s)'} in {seconds:.0f} s. "
        f"GPU: {', '.join(g['name'] for g in host['gpus']) or 'none'}; driver "
        f"{host['driver']}, CUDA {host['cuda_driver']}, cuDNN {host['cudnn']}, "
        f"onnxruntime {host['onnxruntime']}.",
        "",
        "| step | check | result | detail |",
        "| --- | --- | --- | --- |",
    ]
    for c in ctx.checks:
        result = {True: "ok", False: "**FAIL**", None: "skipped"}[c.ok]
        lines.append(f"| {c.step} | {c.name} | {result} | {c.detail.replace('|', '/')} |")
    perf = ctx.data.get("performance", [])
    if perf:
        lines += [
            "",
            "| model | target | batch / callers | rows/s | p50 ms | p99 ms | mean batch "
            "| × in-process |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in perf:
            lines.append(
                f"| {r['model']} | {r['target']} | {r.get('batch', r.get('callers'))} "
                f"| {r['rows_s']:,.0f} | {r.get('p50_ms', 0):.2f} | {r.get('p99_ms', 0):.2f} "
                f"| {r.get('mean_batch', r.get('batch', 0)):.1f} "
                f"| {r['vs_in_process']:.2f} |"
                if "vs_in_process" in r
                else f"| {r['model']} | {r['target']} | {r.get('batch', r.get('callers'))} "
                f"| {r['rows_s']:,.0f} | {r.get('p50_ms', 0):.2f} | {r.get('p99_ms', 0):.2f} "
                f"| {r.get('mean_batch', r.get('batch', 0)):.1f} | |"
            )
    md_path = ctx.out / "gpu_check.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


# --- main ---------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--wheels", type=Path, help="install from this wheel directory first")
    parser.add_argument(
        "--venv", type=Path, default=ROOT / "bench" / "results" / "gpu-venv", help="for --wheels"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes (smoke test)")
    parser.add_argument("--duration", type=float, help="seconds per measured point")
    parser.add_argument("--cycles", type=int, help="load/unload cycles (default 20)")
    parser.add_argument("--out", type=Path, help="where the report goes")
    parser.add_argument(
        "--budget",
        type=float,
        default=450,
        help="seconds the whole run may take; measurements are cut short to fit (default 450)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    host = host_report()
    print(
        f"found: GPU {', '.join(g['name'] for g in host['gpus']) or 'none'}; "
        f"driver {host['driver']}; CUDA (driver) {host['cuda_driver']}; cuDNN {host['cudnn']}; "
        f"onnxruntime {host['onnxruntime']} from {host['onnxruntime_path']} with "
        f"{', '.join(host['providers'])}; {host['cpus']} CPUs",
        flush=True,
    )
    out = args.out or ROOT / "bench" / "results" / time.strftime("gpu-check-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(
            device=args.device,
            quick=args.quick,
            repository=Path(tmp) / "repository",
            out=out,
            duration=args.duration or (0.5 if args.quick else 2.0),
            cycles=args.cycles or (3 if args.quick else 20),
            # The budget counts from the first start, before the install.
            deadline=started + args.budget - (time.time() - float(os.environ[STARTED])),
            host=host,
            started=started,
        )
        if args.device == "cuda":
            ready = "CUDAExecutionProvider" in host["providers"] and bool(host["gpus"])
            ctx.check("0", "CUDA provider and a GPU present", ready, host.get("nvml_error", ""))
            if not ready:
                return finish(ctx, host, started)
        build_repository(ctx)
        steps(ctx)
        return finish(ctx, host, started)


def steps(ctx: Context) -> None:
    """Steps 1-5, the report rewritten after each, so a host cut short still leaves one."""
    from bench.serving import launch_server

    guarded(ctx, "1", lambda: step_providers(ctx))
    try:
        server = launch_server(ctx.repository, ctx.out, timeout=300)
    except Exception as exc:
        ctx.check("2", "the server started", False, f"{type(exc).__name__}: {exc}"[:2000])
    else:
        try:
            guarded(ctx, "2", lambda: step_outputs(ctx, server.url, server.log()))
            guarded(ctx, "3", lambda: step_performance(ctx, server))
            guarded(ctx, "4", lambda: step_metrics(ctx, server))
        finally:
            server.stop()
    guarded(ctx, "5", lambda: step_load_unload(ctx))


def guarded(ctx: Context, step: str, body: Callable[[], None]) -> None:
    """Run one step; an exception fails that step and the others still run."""
    try:
        body()
    except Exception as exc:
        ctx.check(step, "step completed", False, f"{type(exc).__name__}: {exc}")
    write_report(ctx, ctx.host, time.monotonic() - ctx.started)


def finish(ctx: Context, host: dict[str, Any], started: float) -> int:
    seconds = time.monotonic() - started
    json_path, md_path = write_report(ctx, host, seconds)
    failed = [c for c in ctx.checks if c.ok is False]
    print(f"\nreport: {md_path} and {json_path}")
    print(f"{'PASSED' if not failed else f'FAILED: {len(failed)} check(s)'} in {seconds:.0f} s")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--requirements"]:
        # For `pip download` on a machine with network (docs/deploy.md).
        print("\n".join(["onnxruntime-gpu", *requirements()]))
        return 0
    if argv[:1] == ["--load"]:
        load_main(int(argv[1]), argv[2], int(argv[3]), float(argv[4]))
        return 0
    args = parse(argv)
    os.environ.setdefault(STARTED, str(time.time()))
    if not os.environ.get(PREPARED):
        python = sys.executable
        if args.wheels is not None:
            python = str(install(args.wheels, args.venv))
        # The re-executed script sees PREPARED and skips the install.
        reexec(python, argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
