"""``--compute-nice``: ONNX Runtime's threads run below the threads that serve requests.

Read from /proc of a real server: the nice value of every thread of every
server process. The model-owning process (the server itself, or the engine
with ``--frontends 2``) runs its instance threads and ONNX Runtime's pool
threads lowered; event loops, gRPC's threads and front ends stay as started.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from support import ServerProcess, process_tree

pytestmark = [
    pytest.mark.frontends(1, 2),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's"),
]


def _thread_nices(pid: int) -> dict[int, int]:
    """tid -> nice value, from /proc/PID/task/TID/stat (field 19)."""
    nices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # a thread that just ended
        fields = stat[stat.rindex(")") + 2 :].split()
        nices[int(task.name)] = int(fields[16])
    return nices


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _serve_once(server: ServerProcess) -> None:
    with triton.InferenceServerClient(server.url) as client:
        data = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = [triton.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(data)
        result = client.infer("simple", inputs)
        assert result.as_numpy("OUTPUT0") is not None


def _lowered(server: ServerProcess, base: int) -> dict[int, list[int]]:
    """pid -> its threads whose nice differs from ``base``; main threads must not."""
    lowered = {}
    for pid in process_tree(server.process.pid):
        nices = _thread_nices(pid)
        assert nices.get(pid, base) == base, f"main thread of {_comm(pid)} was lowered"
        lowered[pid] = [tid for tid, nice in nices.items() if nice != base]
    return lowered


def test_onnx_runtime_threads_run_lowered(
    start_server: Callable[..., ServerProcess], model_repository: Path, frontends: int
) -> None:
    server = start_server(model_repository, "--compute-nice", "5")
    _serve_once(server)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    expected = min(19, base + 5)
    lowered = _lowered(server, base)
    owners = [pid for pid, tids in lowered.items() if tids]
    assert len(owners) == 1, "only the process that owns the models lowers threads"
    owner = owners[0]
    if frontends == 1:
        assert owner == server.process.pid
    else:
        assert _comm(owner).startswith("lockgate: engin")  # comm keeps 15 characters
    nices = _thread_nices(owner)
    assert {nices[tid] for tid in lowered[owner]} == {expected}
    # Every model instance has its thread, and most models more than one instance.
    assert len(lowered[owner]) >= 2


def test_compute_nice_zero_lowers_nothing(
    start_server: Callable[..., ServerProcess], model_repository: Path
) -> None:
    server = start_server(model_repository, "--compute-nice", "0")
    _serve_once(server)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert all(not tids for tids in _lowered(server, base).values())


def test_compute_nice_out_of_range_is_refused(
    start_server: Callable[..., ServerProcess], model_repository: Path
) -> None:
    server = start_server(model_repository, "--compute-nice", "20", wait=False)
    assert server.process.wait(60) != 0
    assert server.log_path is not None
    assert "0 to 19" in server.log_path.read_text()
