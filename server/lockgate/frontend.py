"""A front-end process (``--frontends N``): gRPC in, the engine process behind.

``FrontendServer`` is the single-process ``LockgateServer`` with its engine
side swapped: a ``RemoteEngine`` instead of a model repository, no metrics
endpoint and no poller (the engine has those), readiness from the engine's
snapshot. Health, reflection, TLS, auth, decoding and encoding are the same
code as with one process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from lockgate.config import ServerConfig
from lockgate.engine import Engine
from lockgate.ipc.slab import Slab
from lockgate.remote_engine import EngineRegions, RemoteEngine
from lockgate.server import LockgateServer
from lockgate.shm import SharedMemoryRegistry

log = logging.getLogger("lockgate.frontend")

#: Each front end's two slabs (inputs it writes, outputs the engine writes).
#: Requests that find a slab full send their bytes inline instead.
SLAB_BYTES = 32 * 2**20


def slab_names(prefix: str, slot: int, generation: int) -> tuple[str, str]:
    """The names of a front end's slabs (the supervisor unlinks them after it)."""
    base = f"{prefix}fe{slot}.{generation}"
    return f"{base}-in", f"{base}-out"


class FrontendServer(LockgateServer):
    """gRPC services over a ``RemoteEngine``."""

    signals = (signal.SIGTERM,)  # SIGINT reaches the whole group: the supervisor decides
    reuseport = True

    def __init__(
        self,
        config: ServerConfig,
        endpoint: str,
        slot: int,
        slabs: tuple[str, str],
        engine_pid: int,
    ) -> None:
        self._endpoint = endpoint
        self._slot = slot
        self._slab_names = slabs
        self._engine_pid = engine_pid
        self._health_tasks: set[asyncio.Future[None]] = set()
        super().__init__(config)

    def _make_engine(self) -> Engine:
        inputs = Slab(self._slab_names[0], SLAB_BYTES, create=True)
        try:
            outputs = Slab(self._slab_names[1], SLAB_BYTES, create=True)
        except BaseException:
            inputs.close()
            raise
        self.remote = RemoteEngine(
            self.config, self._endpoint, inputs, outputs, self._slot, self._engine_lost
        )
        return self.remote

    async def _start_engine(self) -> None:
        from lockgate.supervisor import EARLY_SIGTERM

        if EARLY_SIGTERM.is_set():
            self.request_stop()
        remote = self.remote
        await remote.connect()
        remote.watch_engine(self._engine_pid)
        remote.on_snapshot = self._on_snapshot
        assert self._stopping is not None
        started = asyncio.ensure_future(remote.started.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({started, stopping}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        stopping.cancel()

    def _make_shared_memory(self) -> SharedMemoryRegistry:
        # The engine holds the one registry; ours follows it (snapshots), so a
        # region registered through any front end is known to every one.
        regions = EngineRegions(self.remote)
        self.remote.regions = regions
        return regions

    def _on_snapshot(self) -> None:
        if self._started:
            task = asyncio.ensure_future(self.update_health())
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    def _engine_lost(self) -> None:
        # Nothing can be served without the engine: leave at once (the
        # supervisor restarts the server, or the pod restarts).
        log.error("front end %d: the engine is gone; exiting", self._slot)
        asyncio.get_running_loop().call_later(0.2, _exit_now, 1)

    def _check_ports(self) -> None:
        pass  # the supervisor checked them; the other front ends share the gRPC port

    def _check_repository(self) -> None:
        pass  # the engine process checks it, before it loads anything

    def _readiness(self) -> tuple[bool, dict[str, bool]]:
        return self.remote.readiness()

    async def _drain_engine(self) -> None:
        await self.remote.drain()

    def _close_engine(self) -> None:
        self.remote.close()

    def _loaded_count(self) -> int:
        return sum(self.remote.readiness()[1].values())


def _exit_now(status: int) -> None:
    logging.shutdown()
    os._exit(status)


def frontend_main(
    config: ServerConfig,
    slot: int,
    endpoint: str,
    slabs: tuple[str, str],
    engine_pid: int,
    supervisor_pid: int,
) -> None:
    """A front-end process's entry point (spawned by the supervisor)."""
    from lockgate.supervisor import become_child, run_loop

    become_child(f"frontend-{slot}", config, supervisor_pid)

    async def main() -> None:
        server = FrontendServer(config, endpoint, slot, slabs, engine_pid)
        try:
            await server.start()
        except BaseException:
            await server.abort()
            server.remote.close()
            raise
        await server.serve()

    run_loop(main())
