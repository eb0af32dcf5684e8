"""Does IO binding help? ``session.run`` vs Lockgate's bound runs, same process, same run.

For each example model and batch size it times the two paths alternately in
short slices (``--rounds`` pairs of ``--slice`` seconds), so a machine whose
speed drifts affects both alike, and prints the median time per run of each
and their ratio. ``--device cuda`` measures a GPU instance (onnxruntime-gpu
and a GPU needed). Usage: ``python bench/io_binding.py [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lockgate.binding import BoundRunner  # noqa: E402
from models.build import build_image_classifier, build_mlp, build_simple  # noqa: E402

Feeds = dict[str, np.ndarray[Any, Any]]

CASES: list[tuple[str, Callable[[Path], Path], Callable[[int], Feeds], list[int]]] = [
    (
        "simple",
        build_simple,
        lambda b: {"INPUT0": np.ones((b, 16), np.int32), "INPUT1": np.ones((b, 16), np.int32)},
        [1, 8],
    ),
    ("mlp", build_mlp, lambda b: {"INPUT": np.ones((b, 512), np.float32)}, [1, 16, 64]),
    (
        "image_classifier",
        build_image_classifier,
        lambda b: {"INPUT": np.ones((b, 3, 224, 224), np.float32)},
        [1, 8],
    ),
]


def session(path: Path, device: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else []
    return ort.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"])


def per_run(call: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call over a slice of about ``seconds``."""
    call()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        call()
        count += 1
    return elapsed / max(count, 1)


def compare(
    plain: Callable[[Feeds], object],
    bound: Callable[[Feeds], object],
    feeds: Feeds,
    rounds: int,
    seconds: float,
) -> tuple[float, float]:
    """Median µs per run of each path, timed alternately."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        times[0].append(per_run(lambda: plain(feeds), seconds))
        times[1].append(per_run(lambda: bound(feeds), seconds))
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slice", type=float, default=0.2)
    args = parser.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, device {args.device}")
    print(f"{'model':<18}{'batch':>6}{'run µs':>12}{'bound µs':>12}{'bound/run':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build, make_feeds, batches in CASES:
            model = session(build(Path(tmp)) / "1" / "model.onnx", args.device)
            names = [o.name for o in model.get_outputs()]
            bound = BoundRunner(model)
            for batch in batches:
                run_us, bound_us = compare(
                    functools.partial(model.run, names),
                    bound.run,
                    make_feeds(batch),
                    args.rounds,
                    args.slice,
                )
                print(
                    f"{name:<18}{batch:>6}{run_us:>12.1f}{bound_us:>12.1f}"
                    f"{bound_us / run_us:>11.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
