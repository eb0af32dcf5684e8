"""``--frontends N``: the processes, their faults, and what they leave behind.

The protocol, batching, metrics, tracing and lifecycle suites already run
against two front ends (their ``frontends(1, 2)`` marker); this module covers
what only a multi-process server has: a front end or the engine killed with
SIGKILL under load, the drain of every process, role names, load/unload seen
through every front end, and shared memory left in /dev/shm.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from support import ServerProcess, launch_server
from tritonclient.utils import InferenceServerException

from models.build import build_simple

#: Bound on every wait; reaching it is a failure, never a pass.
PATIENCE_S = 30.0
CALLERS = 8
#: gRPC core cancels calls that reached a stopping server before any handler
#: (grpc/grpc#41785): a caller may see those as CANCELLED, or a reset.
DROPPED = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("frontends-repo")
    build_simple(repo)
    return repo


@pytest.fixture
def start(repo: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        server = launch_server(repo, tmp_path, "--drain-seconds", "10", *extra, frontends=2)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(15)
        assert not stale_slabs(server), "shared memory left in /dev/shm"


def stale_slabs(server: ServerProcess) -> list[str]:
    prefix = f"lockgate-{server.process.pid}-"
    return [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)]


def pids(server: ServerProcess, role: str) -> list[int]:
    """PIDs the supervisor logged for ``role`` ('engine' or 'front end 0'), oldest first."""
    pattern = re.escape(role) + r" started \(pid (\d+)\)"
    return [int(p) for p in re.findall(pattern, server.log())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes; its parent reaps it.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def named(pid: int, expected: str) -> bool:
    """Whether process ``pid``'s title (its /proc cmdline) is ``expected``."""
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode().strip() == expected


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {PATIENCE_S} s for {what}")
        time.sleep(0.05)


class Load:
    """Callers on their own connections (so both front ends get some), until stopped."""

    def __init__(self, server: ServerProcess, callers: int = CALLERS) -> None:
        self.url = server.url
        self.stop = threading.Event()
        self.ok = 0
        self.wrong = 0
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._call, args=(i,)) for i in range(callers)]
        for thread in self._threads:
            thread.start()

    def _call(self, index: int) -> None:
        data = np.full((1, 16), index, dtype=np.int32)
        inputs = []
        for name in ("INPUT0", "INPUT1"):
            tensor = tc.InferInput(name, [1, 16], "INT32")
            tensor.set_data_from_numpy(data)
            inputs.append(tensor)
        while not self.stop.is_set():
            # A fresh connection now and then: the kernel spreads them over the front ends.
            with tc.InferenceServerClient(self.url) as client:
                for _ in range(20):
                    if self.stop.is_set():
                        return
                    try:
                        result = client.infer("simple", inputs, client_timeout=PATIENCE_S)
                    except InferenceServerException as exc:
                        with self._lock:
                            self.errors[str(exc.status())] += 1
                        time.sleep(0.01)
                        break  # a new connection, as a client after an error would
                    good = (result.as_numpy("OUTPUT0") == 2 * index).all()
                    with self._lock:
                        self.ok += int(good)
                        self.wrong += int(not good)

    def served(self) -> int:
        with self._lock:
            return self.ok

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(PATIENCE_S)
            assert not thread.is_alive(), "a caller hangs"


def test_processes_are_named_for_their_role(start: Callable[..., ServerProcess]) -> None:
    server = start()
    roles = {
        pid: role for role in ("engine", "front end 0", "front end 1") for pid in pids(server, role)
    }
    assert len(roles) == 3, server.log()
    for pid, role in roles.items():
        expected = "lockgate: engine" if role == "engine" else f"lockgate: frontend-{role[-1]}"
        # The server is ready once one front end answers; another may still be
        # importing, before it can name itself.
        wait_for(functools.partial(named, pid, expected), f"{role}'s title")
    with open(f"/proc/{server.process.pid}/cmdline", "rb") as cmdline:
        assert cmdline.read().startswith(b"lockgate: supervisor")
    # Every log line says which process wrote it.
    lines = [line for line in server.log().splitlines() if " INFO " in line]
    assert lines and all(
        re.search(r" \[(supervisor|engine|frontend-\d)\] ", line) for line in lines
    )


def test_killed_frontend_is_restarted_and_others_keep_serving(
    start: Callable[..., ServerProcess],
) -> None:
    server = start()
    load = Load(server)
    try:
        wait_for(lambda: load.served() > 50, "load on both front ends")
        victim = pids(server, "front end 0")[0]
        prefix = f"lockgate-{server.process.pid}-fe0.1-"
        assert any(p.name.startswith(prefix) for p in Path("/dev/shm").iterdir())
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(pids(server, "front end 0")) == 2, "front end 0 to be restarted")
        before = load.served()
        wait_for(lambda: load.served() > before + 50, "requests served after the restart")
    finally:
        load.join()
    assert load.wrong == 0
    # What was in flight on the killed process failed; nothing else did, nothing hung.
    assert set(load.errors) <= DROPPED, load.errors
    assert "slab(s) reclaimed" in server.log()
    assert not any(p.name.startswith(prefix) for p in Path("/dev/shm").iterdir())
    assert server.stop() == 0, server.log()


def test_killed_engine_takes_every_process_down(start: Callable[..., ServerProcess]) -> None:
    server = start()
    load = Load(server)
    try:
        wait_for(lambda: load.served() > 50, "load")
        frontends = pids(server, "front end 0") + pids(server, "front end 1")
        os.kill(pids(server, "engine")[0], signal.SIGKILL)
        # The front ends notice at once (pidfd) and leave; the supervisor exits 1.
        wait_for(lambda: not any(alive(pid) for pid in frontends), "the front ends to exit")
        assert server.process.wait(PATIENCE_S) == 1
    finally:
        load.join()
    assert set(load.errors) <= DROPPED, load.errors
    assert "the engine exited" in server.log()
    assert not stale_slabs(server)


def test_slabs_of_a_killed_supervisor_go_with_the_next_server(
    start: Callable[..., ServerProcess],
) -> None:
    """SIGKILL cleans nothing up; the next server on the host removes what was left."""
    survivor = start()  # alive throughout: its slabs must stay
    killed = start()
    children = pids(killed, "engine") + pids(killed, "front end 0") + pids(killed, "front end 1")
    killed.process.kill()
    killed.process.wait(PATIENCE_S)
    wait_for(lambda: not any(alive(pid) for pid in children), "the children to exit")
    left = stale_slabs(killed)
    assert any(name.endswith("-in") for name in left), left  # the front ends' slabs
    assert f"lockgate-{killed.process.pid}-lease" in left
    rundirs = list(Path(tempfile.gettempdir()).glob(f"lockgate-{killed.process.pid}-*"))
    assert rundirs, "the killed supervisor's run directory"
    successor = start()
    assert not stale_slabs(killed)
    assert not any(path.exists() for path in rundirs)
    assert "slab(s) of servers killed before they could" in successor.log()
    assert stale_slabs(survivor), "a live server's slabs were removed"
    with tc.InferenceServerClient(survivor.url) as client:
        assert client.is_server_ready()


def test_sigterm_under_load_drains_every_process(start: Callable[..., ServerProcess]) -> None:
    server = start()
    load = Load(server)
    try:
        wait_for(lambda: load.served() > 50, "load")
        server.signal(signal.SIGTERM)
        assert server.process.wait(PATIENCE_S) == 0, server.log()
    finally:
        load.join()
    # Accepted requests were all answered; new ones were refused UNAVAILABLE.
    assert load.wrong == 0
    assert set(load.errors) <= DROPPED, load.errors
    log = server.log()
    assert log.count("drained and stopped") == 2 and "engine stopped" in log
    # A front end waits for nothing once it has closed its link to the engine.
    assert "a batch is still running" not in log
    assert "Traceback" not in log
    assert not stale_slabs(server)


def test_load_and_unload_through_one_frontend_are_seen_by_all(
    start: Callable[..., ServerProcess],
) -> None:
    server = start("--model-control-mode", "explicit")

    def ready_everywhere(expected: bool) -> bool:
        # Fresh connections land on either front end: ask several times.
        for _ in range(8):
            with tc.InferenceServerClient(server.url) as client:
                if client.is_model_ready("simple") != expected:
                    return False
        return True

    assert ready_everywhere(False)
    with tc.InferenceServerClient(server.url) as client:
        client.load_model("simple")
    assert ready_everywhere(True)
    with tc.InferenceServerClient(server.url) as client:
        client.unload_model("simple")
    wait_for(lambda: ready_everywhere(False), "the unload to reach every front end")
