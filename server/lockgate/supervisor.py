"""``--frontends N``: the main process, which owns the engine and front-end processes.

It starts one engine process and N front ends (spawned, never forked: gRPC
and ONNX Runtime threads do not survive a fork), then watches them:

* a front end that dies is restarted with backoff, and the slabs it left in
  /dev/shm are unlinked;
* if the engine dies, the front ends notice (pidfd) and exit at once; the
  supervisor exits 1, so the container restarts as a whole;
* SIGTERM/SIGINT: every front end drains (NOT_SERVING, new requests
  UNAVAILABLE, accepted ones finish), then the engine drains, and all exit 0.
  A second signal kills everything and exits 1.

Children die with the supervisor (PR_SET_PDEATHSIG), so a killed supervisor
leaves no orphans, and ``ps`` shows each process's role.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from lockgate.config import ServerConfig
from lockgate.ipc.slab import (
    ServerLease,
    dead_servers,
    remove_slabs,
    slab_prefix,
)
from lockgate_client._loop import run

log = logging.getLogger("lockgate.supervisor")

#: Restart backoff for a front end that dies: doubles per quick death, up to the cap.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
#: A front end that ran this long before dying is restarted at once.
BACKOFF_RESET_S = 30.0
#: Exit status of a child that cannot start at all (port taken, bad TLS files):
#: restarting it would fail the same way.
EXIT_CANNOT_START = 78

PR_SET_PDEATHSIG = 1

#: A child got SIGTERM before its event loop could handle it: stop once started.
EARLY_SIGTERM = threading.Event()


def set_title(role: str) -> None:
    """Name the process for ``ps``/``top`` after its role."""
    title = f"lockgate: {role}"
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass
    try:  # the kernel's name (comm): what `ps -e` and `top` show
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def become_child(role: str, config: ServerConfig, supervisor_pid: int) -> None:
    """What every child does first: die with the supervisor, name itself, log its role."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor_pid:  # it died before prctl took effect
        os._exit(1)
    # Ctrl-C signals the whole process group; the supervisor orders the drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until the child's own handler is in place (a front end restarted just as
    # the drain began), SIGTERM is remembered rather than fatal.
    signal.signal(signal.SIGTERM, lambda signum, frame: EARLY_SIGTERM.set())
    set_title(role)
    from lockgate.allocator import tune_malloc
    from lockgate.logs import configure_logging

    configure_logging(config.log_level, config.log_format, role=role)
    tune_malloc()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a child's main coroutine on the fastest loop; exit with its status."""
    from lockgate.errors import LockgateError
    from lockgate.security import SecurityConfigError

    try:
        run(main)
    except (OSError, SecurityConfigError) as exc:
        logging.getLogger("lockgate").error("%s", exc)
        logging.shutdown()
        os._exit(EXIT_CANNOT_START)
    except LockgateError as exc:  # a repository the server cannot start with
        logging.getLogger("lockgate").error("%s", exc.message)
        logging.shutdown()
        os._exit(EXIT_CANNOT_START)
    logging.shutdown()


class _Frontend:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.generation = 0
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started_at = 0.0
        self.backoff = BACKOFF_FIRST_S
        self.restart_at: float | None = None


class Supervisor:
    """Starts, watches and stops the engine and the front ends."""

    def __init__(self, config: ServerConfig, frontends: int) -> None:
        self.config = config
        self.count = frontends
        self.pid = os.getpid()
        self.prefix = slab_prefix(self.pid)
        self._context = multiprocessing.get_context("spawn")
        #: Made once our lease is held (``run``), named with the prefix: the next
        #: server removes it if we are SIGKILLed.
        self._rundir = ""
        #: The engine's Unix socket (ipc/channel.py).
        self.endpoint = ""
        self._engine: multiprocessing.process.BaseProcess | None = None
        self._frontends = [_Frontend(slot) for slot in range(frontends)]
        self._signals = 0
        self._status = 0

    def run(self) -> int:
        from lockgate.server import ListenError, check_ports

        try:
            check_ports(self.config)
        except ListenError as exc:
            log.error("%s", exc)
            return 1
        set_title("supervisor")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        remove_slabs(self.prefix)  # a previous process with our pid crashed
        self._remove_what_killed_servers_left()
        lease = ServerLease(self.prefix)
        self._rundir = tempfile.mkdtemp(prefix=self.prefix)
        self.endpoint = f"{self._rundir}/engine.sock"
        try:
            self._start_engine()
            for frontend in self._frontends:
                self._start_frontend(frontend)
            self._watch()
            if self._signals:
                self._stop()
        finally:
            self._kill_all()
            remove_slabs(self.prefix)
            lease.close()
            shutil.rmtree(self._rundir, ignore_errors=True)
        return self._status

    def _remove_what_killed_servers_left(self) -> None:
        """Slabs and run directories of servers killed before they could remove them."""
        removed = []
        for prefix in dead_servers():
            removed.extend(remove_slabs(prefix))
            for rundir in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
                shutil.rmtree(rundir, ignore_errors=True)
        if removed:
            log.info("removed %d slab(s) of servers killed before they could", len(removed))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: draining the front ends, then the engine", signal.Signals(signum).name)
        else:
            log.warning(
                "second %s: exiting now, killing every process", signal.Signals(signum).name
            )
            self._kill_all()
            remove_slabs(self.prefix)
            if self._rundir:
                shutil.rmtree(self._rundir, ignore_errors=True)
            logging.shutdown()
            os._exit(1)

    # --- children -----------------------------------------------------------------------

    def _start_engine(self) -> None:
        from lockgate.engine_process import engine_main

        self._engine = self._context.Process(
            target=engine_main,
            args=(self.config, self.endpoint, self.pid),
            name="lockgate-engine",
            daemon=False,
        )
        self._engine.start()
        log.info("engine started (pid %d)", self._engine.pid)

    def _start_frontend(self, frontend: _Frontend) -> None:
        from lockgate.frontend import frontend_main, slab_names

        assert self._engine is not None and self._engine.pid is not None
        frontend.generation += 1
        slabs = slab_names(self.prefix, frontend.slot, frontend.generation)
        frontend.process = self._context.Process(
            target=frontend_main,
            args=(self.config, frontend.slot, self.endpoint, slabs, self._engine.pid, self.pid),
            name=f"lockgate-frontend-{frontend.slot}",
            daemon=False,
        )
        frontend.process.start()
        frontend.started_at = time.monotonic()
        frontend.restart_at = None
        log.info("front end %d started (pid %d)", frontend.slot, frontend.process.pid)

    def _watch(self) -> None:
        """Until a signal: restart front ends that die; stop if the engine does."""
        assert self._engine is not None
        while not self._signals:
            sentinels = [self._engine.sentinel] + [
                f.process.sentinel
                for f in self._frontends
                if f.process is not None and f.restart_at is None
            ]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            if self._signals:
                return
            if self._engine.exitcode is not None:
                log.error(
                    "the engine exited (status %s): stopping the front ends and exiting",
                    self._engine.exitcode,
                )
                self._status = 1
                return
            now = time.monotonic()
            for frontend in self._frontends:
                process = frontend.process
                if frontend.restart_at is not None:
                    if now >= frontend.restart_at:
                        self._start_frontend(frontend)
                elif process is not None and process.exitcode is not None:
                    if process.exitcode == EXIT_CANNOT_START:
                        log.error("front end %d cannot start: stopping", frontend.slot)
                        self._status = 1
                        return
                    self._schedule_restart(frontend, now)

    def _schedule_restart(self, frontend: _Frontend, now: float) -> None:
        assert frontend.process is not None
        ran = now - frontend.started_at
        if ran >= BACKOFF_RESET_S:
            frontend.backoff = BACKOFF_FIRST_S
        delay = frontend.backoff if ran < BACKOFF_RESET_S else 0.0
        frontend.backoff = min(BACKOFF_MAX_S, frontend.backoff * 2)
        removed = remove_slabs(f"{self.prefix}fe{frontend.slot}.{frontend.generation}-")
        log.warning(
            "front end %d (pid %d) exited with status %s; %d slab(s) reclaimed; "
            "restarting in %.1f s",
            frontend.slot,
            frontend.process.pid,
            frontend.process.exitcode,
            len(removed),
            delay,
        )
        frontend.restart_at = now + delay

    # --- stopping -------------------------------------------------------------------------

    def _stop(self) -> None:
        """Front ends drain first (they need the engine to finish), then the engine."""
        limit = self.config.drain_seconds + 10.0
        engine = self._engine
        if engine is not None and engine.exitcode is None and engine.pid is not None:
            os.kill(engine.pid, signal.SIGUSR1)  # no more polling or loads under the drain
        frontends = [f.process for f in self._frontends if f.process is not None]
        for process in frontends:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in frontends:
            process.join(limit)
            # Killed by the SIGTERM itself: a front end still starting (no
            # handler yet), which had accepted nothing: a clean stop too.
            if process.exitcode not in (0, None, -signal.SIGTERM):
                self._status = 1
        if engine is not None and engine.exitcode is None and engine.pid is not None:
            os.kill(engine.pid, signal.SIGTERM)
            engine.join(limit)
            if engine.exitcode != 0:
                self._status = 1
        log.info("all processes stopped")

    def _kill_all(self) -> None:
        processes = [self._engine] + [f.process for f in self._frontends]
        for process in processes:
            if process is not None and process.exitcode is None and process.pid is not None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                process.join(5)
