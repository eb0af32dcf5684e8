"""Where the server is in its life, as every part of it needs to know.

One ``Lifecycle`` per process, made by the server and passed explicitly to
each part that reads it: the servicer (readiness, draining), the repository
and the model versions it loads (loads abandoned, drain expired). Only
``server.py`` moves it forward; everyone else reads it.

start ──▶ ready ──(SIGTERM)──▶ draining ──(drain time up)──▶ drain expired
   └─(SIGTERM while loading)─▶ loads abandoned ─▶ draining
"""

from __future__ import annotations

import threading
import time

from lockgate.errors import LoadAbandonedError


class Lifecycle:
    """The server's lifecycle state: readiness, drain, abandoned loads."""

    def __init__(self) -> None:
        #: Published readiness: startup loading is over and (with strict
        #: readiness) every model is ready. ServerReady and health report it.
        self.ready = False
        #: A stop began: new inference is refused (UNAVAILABLE), accepted work finishes.
        self.draining = False
        #: Set at the first SIGTERM/SIGINT: loads in progress give up at their next
        #: step and no new one starts. An Event: load threads read it.
        self.loads_abandoned = threading.Event()
        #: The drain deadline passed: from now on requests are cancelled by the
        #: server stopping under them, not by their callers.
        self.drain_expired = False

    def check_loading(self, name: str) -> None:
        """Raise LoadAbandonedError if the server is stopping (load threads call this)."""
        if self.loads_abandoned.is_set():
            raise LoadAbandonedError(
                f"loading model '{name}' was abandoned: the server is stopping"
            )

    def cancellation(self, deadline: float | None) -> tuple[str, str]:
        """Why a request was cancelled: its failure reason and log message.

        The reason is what the failure statistics and metrics count, so a pod
        cut short by its drain time shows as the server's doing (UNAVAILABLE),
        not as impatient clients.
        """
        if deadline is not None and time.monotonic() >= deadline:
            return "DEADLINE_EXCEEDED", "the caller's deadline passed"
        if self.drain_expired:
            return "UNAVAILABLE", "the server's drain time ran out before the request completed"
        return "CANCELLED", "the caller cancelled"
