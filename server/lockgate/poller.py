"""``--model-control-mode poll``: follow the repository on disk.

Every ``--repository-poll-secs`` the repository is rescanned. A new model is
loaded; a changed one (any file's size or mtime) is reloaded, its new
versions serving before the old ones drain, so no request fails; a removed
model is drained and unloaded. Polling stops when the server starts to drain:
a draining server loads and unloads nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from lockgate.errors import LoadAbandonedError, LockgateError
from lockgate.repository import ModelRepository

log = logging.getLogger("lockgate.poller")

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """What changes when any file under ``path`` is added, removed or rewritten."""
    if path.is_file():
        stat = path.stat()
        return ((path.name, stat.st_size, stat.st_mtime_ns),)
    entries = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        entries.append((str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


class RepositoryPoller:
    """Reconciles the loaded models with the repository, periodically."""

    def __init__(
        self,
        repository: ModelRepository,
        interval: float,
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        """Poll ``repository`` every ``interval`` s; ``on_change`` after each scan."""
        self._repository = repository
        self._interval = interval
        self._on_change = on_change
        self._seen: dict[str, Fingerprint] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        #: A load or unload is under way: stop() lets it end rather than cancel it.
        self._acting = False
        for name, source in self._repository.discover().items():
            self._seen[name] = fingerprint(source.single_file or source.directory)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Poll no more; a load or unload under way ends, and nothing starts after it.

        Cancelling an unload halfway would leave its model neither serving nor
        closed; a load under way gives up by itself at its next step, since the
        server's stop abandons loads (Lifecycle.loads_abandoned).
        """
        self._stopped = True
        if self._task is not None and not self._acting:
            self._task.cancel()

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
            except Exception:  # keep polling whatever one scan hit
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        sources = await asyncio.to_thread(self._repository.discover)
        current = {
            name: await asyncio.to_thread(fingerprint, s.single_file or s.directory)
            for name, s in sources.items()
        }
        for name in sorted(set(self._seen) - set(current)):
            if self._stopped:
                return
            log.info("model %s removed from the repository: unloading", name)
            await self._attempt(self._repository.unload(name))
        for name, print_ in sorted(current.items()):
            if self._stopped:
                return
            if self._seen.get(name) != print_:
                log.info("model %s new or changed: loading", name)
                await self._attempt(self._repository.load(name, sources=sources))
        self._seen = current
        await self._on_change()

    async def _attempt(self, action: Coroutine[Any, Any, None]) -> None:
        self._acting = True
        try:
            await action
        except LoadAbandonedError:
            pass  # the server is stopping: not a failure to report
        except LockgateError as exc:
            log.error("%s", exc.message)
        finally:
            self._acting = False
