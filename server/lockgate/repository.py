"""The model repository: finds models and versions on disk and owns their lifecycle.

Layout (Triton's): ``<repo>/<model>/config.pbtxt`` and
``<repo>/<model>/<version>/model.onnx``. A path to a single ``.onnx`` file
serves that file as version 1 of a model named after it. Loading runs in a
worker thread so the event loop keeps serving; a model that fails to load is
reported in the index with its reason and never stops the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lockgate.batcher import BatchObserver
from lockgate.cache import ResponseCache
from lockgate.config import (
    DEFAULT_MODEL_FILENAME,
    ServerConfig,
    parse_config_override,
    read_model_config,
)
from lockgate.ensemble import dependencies, is_ensemble
from lockgate.errors import (
    InvalidInputError,
    LoadAbandonedError,
    LockgateError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    clip,
)
from lockgate.lifecycle import Lifecycle
from lockgate.loader import load_ensemble, load_version
from lockgate.model import ModelState, ModelVersion
from lockgate.uploads import remove_scratch, write_model_files
from lockgate_client._proto import model_config_pb2 as mc

log = logging.getLogger("lockgate.repository")


#: Versions are int64 in Triton: 19 digits. Longer strings are refused before
#: int() sees them (Python refuses to convert more than 4300 digits).
MAX_VERSION_DIGITS = 19


@dataclass
class VersionState:
    state: ModelState
    reason: str = ""
    model: ModelVersion | None = None


class DuplicateModelError(ModelLoadError):
    """Two model paths that would serve under one model name."""

    def __init__(self, name: str, first: Path, second: Path) -> None:
        super().__init__(
            f"two models are named '{name}': {first} and {second}. A model is named "
            "after its .onnx file or its directory in a repository; rename one of them "
            "(e.g. copy it to a repository as <repository>/<name>/1/model.onnx)"
        )


@dataclass
class ModelSource:
    """Where a model's files are: its directory, or a single .onnx file."""

    name: str
    directory: Path
    single_file: Path | None = None

    @property
    def location(self) -> Path:
        return self.single_file or self.directory

    def config(self) -> mc.ModelConfig:
        """Its ``config.pbtxt``; empty where there is none (Triton treats both alike)."""
        if self.single_file is not None:
            return mc.ModelConfig()
        return read_model_config(self.directory)

    def versions(self, config: mc.ModelConfig) -> dict[int, Path]:
        """Version number -> model file, filtered by the version policy."""
        if self.single_file is not None:
            return {1: self.single_file}
        filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
        if PurePosixPath(filename).name != filename or filename in (".", "..") or "\\" in filename:
            # A file name, not a path: a model reads only its own directory.
            raise ModelLoadError(
                f"model '{self.name}': default_model_filename {filename!r} must be a file name"
            )
        if is_ensemble(config):
            # An ensemble has no model file: its version directories may be empty.
            found = {
                int(entry.name): entry
                for entry in self.directory.iterdir()
                if entry.is_dir() and _is_number(entry.name)
            }
            return select_versions(found or {1: self.directory}, config.version_policy)
        found = {
            int(entry.name): entry / filename
            for entry in self.directory.iterdir()
            if entry.is_dir() and _is_number(entry.name) and (entry / filename).exists()
        }
        return select_versions(found, config.version_policy)


def select_versions(found: dict[int, Path], policy: mc.ModelVersionPolicy) -> dict[int, Path]:
    """Apply Triton's version_policy (default: the latest one)."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return dict(found)
    if choice == "specific":
        return {v: found[v] for v in policy.specific.versions if v in found}
    latest = policy.latest.num_versions if choice == "latest" else 1
    keep = sorted(found, reverse=True)[: max(1, latest)]
    return {v: found[v] for v in keep}


@dataclass
class ModelEntry:
    source: ModelSource
    versions: dict[int, VersionState] = field(default_factory=dict)
    #: Why the model as a whole cannot load (bad config, no versions...).
    reason: str = ""
    #: Directory we created for a RepositoryModelLoad with files; removed on unload.
    scratch: Path | None = None
    #: Unloaded on request: listed in the index, but not owed to strict readiness.
    unloaded: bool = False
    #: A load is in progress (its versions are LOADING once they are known).
    loading: bool = False
    #: Strict readiness waits for it: loaded at startup, or has served since.
    #: A new model that never served does not take a serving server out of
    #: rotation when its load fails.
    owed: bool = False
    #: An ensemble's composing models.
    depends_on: list[str] = field(default_factory=list)
    #: An ensemble unloaded because a composing model was: reloaded when it is back.
    orphaned: bool = False


class ModelRepository:
    """All models this server knows of, and which of their versions are ready."""

    def __init__(
        self,
        config: ServerConfig,
        lifecycle: Lifecycle,
        observer: BatchObserver | None = None,
    ) -> None:
        self.config = config
        #: The server's lifecycle, as every model version loaded from here sees it.
        self.lifecycle = lifecycle
        #: Given to each version's scheduler (tracing's execute spans), or None.
        self._observer = observer
        self._entries: dict[str, ModelEntry] = {}
        #: name -> highest ready version, for requests that name no version.
        self._default: dict[str, ModelVersion] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: One response cache for the server, used by models that enable it.
        self.cache = (
            ResponseCache(config.response_cache_bytes) if config.response_cache_bytes else None
        )
        #: Versions no longer routed to whose queued requests are still finishing.
        self._retiring: set[ModelVersion] = set()

    # --- lookup (hot path) ----------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The ready model version a request should use, or a typed error."""
        if not version:
            model = self._default.get(name)
            if model is not None:
                return model
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model '{clip(name)}'")
        if not version:
            raise ModelUnavailableError(f"model '{name}' has no ready version{_why(entry)}")
        if not _is_number(version) or len(version) > MAX_VERSION_DIGITS:
            raise InvalidInputError(
                f"model version {clip(version)!r} is not a version number "
                f"(at most {MAX_VERSION_DIGITS} digits)"
            )
        state = entry.versions.get(int(version))
        if state is None:
            raise ModelNotFoundError(f"model '{name}' has no version {version}")
        if state.model is None or state.state != ModelState.READY:
            detail = f": {state.reason}" if state.reason else ""
            raise ModelUnavailableError(
                f"model '{name}' version {version} is not ready ({state.state}){detail}"
            )
        return state.model

    def ready_models(self) -> list[ModelVersion]:
        # list(): the metrics thread calls this while the loop may add models.
        return [
            s.model
            for e in list(self._entries.values())
            for s in list(e.versions.values())
            if s.model is not None and s.state == ModelState.READY
        ]

    def version_states(self) -> list[tuple[str, str, ModelState]]:
        """(name, version, state) of every version this server owes, ready or not.

        For /metrics: a failed or loading version must show as not ready, or an
        alert on ``lockgate_model_ready == 0`` can never fire. A model that
        failed before any version was known (a bad config.pbtxt) is version "".
        Models unloaded on request are left out: nothing is owed for them.
        """
        rows: list[tuple[str, str, ModelState]] = []
        # list(): the metrics thread calls this while the loop may change entries.
        for name, entry in sorted(list(self._entries.items())):
            if entry.unloaded:
                continue
            versions = sorted(list(entry.versions.items()))
            if versions:
                rows += [(name, str(v), s.state) for v, s in versions]
                continue
            state = ModelState.LOADING if entry.loading else ModelState.UNAVAILABLE
            rows.append((name, "", state))
        return rows

    def all_ready(self) -> bool:
        """Every model owed has a ready version (strict readiness).

        Owed: the models loaded at startup, and any model once it has served.
        A model loaded later that fails before it ever served is reported in
        the index but leaves readiness alone (Kubernetes would otherwise take
        a pod that serves every other model out of its Service).
        """
        return all(
            e.unloaded
            or not e.owed
            or any(s.state == ModelState.READY for s in e.versions.values())
            for e in self._entries.values()
        )

    def index(self, ready_only: bool = False) -> list[tuple[str, str, ModelState, str]]:
        """(name, version, state, reason) rows, as RepositoryIndex reports them."""
        rows: list[tuple[str, str, ModelState, str]] = []
        if not ready_only:
            # Like Triton, list models on disk that were never loaded (explicit mode).
            try:
                on_disk = self.discover()
            except LockgateError:
                on_disk = {}
            rows += [
                (n, "", ModelState.UNAVAILABLE, "not loaded")
                for n in on_disk
                if n not in self._entries
            ]
        for name, entry in sorted(self._entries.items()):
            if not entry.versions:
                if not ready_only:
                    overall = ModelState.LOADING if entry.loading else ModelState.UNAVAILABLE
                    rows.append((name, "", overall, "" if entry.loading else entry.reason))
                continue
            for version, state in sorted(entry.versions.items()):
                if ready_only and state.state != ModelState.READY:
                    continue
                rows.append((name, str(version), state.state, state.reason))
        return sorted(rows)

    def names(self) -> list[str]:
        return sorted(self._entries)

    # --- discovery -------------------------------------------------------------

    def check_locations(self) -> None:
        """At startup: every configured path must exist; an empty repository is worth a warning.

        A mistyped path would otherwise serve nothing and look like success.
        Raises FileNotFoundError / NotADirectoryError (the server exits non-zero).
        """
        for location in self.config.model_repository:
            path = Path(location)
            kind = "model file" if path.suffix == ".onnx" else "model repository"
            if not path.exists():
                raise FileNotFoundError(f"{kind} {location} does not exist")
            if path.is_file():
                if path.suffix != ".onnx":
                    raise NotADirectoryError(
                        f"{location} is neither a model repository (a directory) nor an .onnx file"
                    )
                continue
            if not any(c.is_dir() and not c.name.startswith(".") for c in path.iterdir()):
                log.warning(
                    "model repository %s is empty: expected <model>/<version>/%s "
                    "(and optionally <model>/config.pbtxt) under it",
                    location,
                    DEFAULT_MODEL_FILENAME,
                )

    def discover(self) -> dict[str, ModelSource]:
        """Every model found under the configured paths."""
        sources: dict[str, ModelSource] = {}

        def add(source: ModelSource) -> None:
            other = sources.get(source.name)
            if other is not None:
                raise DuplicateModelError(source.name, other.location, source.location)
            sources[source.name] = source

        for location in self.config.model_repository:
            path = Path(location)
            if path.is_file() and path.suffix == ".onnx":
                add(ModelSource(path.stem, path.parent, single_file=path))
                continue
            if not path.exists():
                raise ModelLoadError(f"model repository {path} does not exist")
            if not path.is_dir():
                raise ModelLoadError(f"{path} is neither a model repository nor an .onnx file")
            for child in sorted(path.iterdir()):
                if child.is_dir() and not child.name.startswith("."):
                    add(ModelSource(child.name, child))
        return sources

    def check_names(self) -> None:
        """Raise DuplicateModelError if two model paths give one model name.

        Called before the server starts: serving one of the two and silently
        dropping the other would answer with the wrong model.
        """
        try:
            self.discover()
        except DuplicateModelError:
            raise
        except LockgateError:
            pass  # reported per model when the loads run

    async def load_all(self, names: Iterable[str] | None = None) -> None:
        """Load the given models (all discovered ones by default), concurrently."""
        sources = self.discover()
        wanted = list(sources) if names is None else list(names)
        for name in wanted:
            if name not in sources:
                raise ModelNotFoundError(f"no model '{clip(name)}' in the model repository")
        # Wait for every load, not just the first failure: readiness and
        # per-model health are published once this returns. Ensembles load
        # after the models they compose (nested ones after their inner ones).
        ensembles = {name: self._dependencies(name, None, sources) for name in wanted}
        ensembles = {name: deps for name, deps in ensembles.items() if deps}
        results = await asyncio.gather(
            *(
                self.load(name, sources=sources, owed=True)
                for name in wanted
                if name not in ensembles
            ),
            return_exceptions=True,
        )
        for name in _ensemble_order(ensembles):
            try:
                await self.load(name, sources=sources, owed=True)
            except BaseException as exc:
                results.append(exc)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, LockgateError):
                raise error
        if errors:
            raise errors[0]

    # --- load / unload ---------------------------------------------------------

    async def load(
        self,
        name: str,
        config_json: str | None = None,
        files: dict[str, bytes] | None = None,
        sources: dict[str, ModelSource] | None = None,
        owed: bool = False,
        chain: frozenset[str] = frozenset(),
    ) -> None:
        """Load (or reload) ``name``; new versions serve before old ones drain.

        ``owed``: strict readiness waits for this model even if it never
        serves (startup loads); otherwise only once it has served.

        An ensemble's composing models that are not loaded are loaded first,
        and ensembles that lost this model when it was unloaded come back after
        it, as Triton does. ``chain`` holds the loads this one is part of.
        """
        chain = chain | {name}
        depends_on: list[str] = []
        if not files:
            sources = sources if sources is not None else self.discover()
            depends_on = self._dependencies(name, config_json, sources)
            for dependency in depends_on:
                entry = self._entries.get(dependency)
                wanted = entry is None or entry.unloaded
                if dependency in chain or dependency not in sources or not wanted:
                    continue
                with contextlib.suppress(LockgateError):  # the ensemble's load names the step
                    await self.load(dependency, sources=sources, chain=chain)
        try:
            await self._load_one(name, config_json, files, sources, owed)
        finally:
            if name in self._entries:
                self._entries[name].depends_on = depends_on
                self._entries[name].orphaned = False
        for dependent, entry in list(self._entries.items()):
            if entry.orphaned and name in entry.depends_on and dependent not in chain:
                with contextlib.suppress(LockgateError):  # its own entry says why
                    await self.load(dependent, chain=chain)

    def _dependencies(
        self, name: str, config_json: str | None, sources: dict[str, ModelSource]
    ) -> list[str]:
        """The models an ensemble composes; [] for other models and unreadable configs."""
        try:
            if config_json is not None:
                config = parse_config_override(config_json, name)
            elif name in sources:
                config = sources[name].config()
            else:
                return []
        except LockgateError:
            return []  # the load itself reports the broken config
        return dependencies(config) if is_ensemble(config) else []

    async def _load_one(
        self,
        name: str,
        config_json: str | None,
        files: dict[str, bytes] | None,
        sources: dict[str, ModelSource] | None,
        owed: bool,
    ) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            # Before any state changes: a load refused here leaves no trace.
            self.lifecycle.check_loading(name)
            scratch = None
            if files:
                if config_json is None:
                    raise InvalidInputError(
                        "loading a model from files needs a 'config' parameter too"
                    )
                scratch = write_model_files(name, files)
                source = ModelSource(name, scratch)
            else:
                sources = sources if sources is not None else self.discover()
                if name not in sources:
                    raise ModelNotFoundError(f"no model '{clip(name)}' in the model repository")
                source = sources[name]
            entry = self._entries.get(name)
            old = dict(entry.versions) if entry else {}
            new_entry = ModelEntry(source=source, scratch=scratch)
            self._entries[name] = new_entry if entry is None else entry
            target = self._entries[name]
            target.unloaded = False
            target.owed = target.owed or owed
            target.loading = True
            try:
                config, paths = await asyncio.to_thread(self._plan_versions, source, config_json)
                # Versions not serving yet show LOADING until they are loaded.
                target.versions = {**{v: VersionState(ModelState.LOADING) for v in paths}, **old}
                loaded = await asyncio.to_thread(self._load_versions, source, config, paths)
            except LockgateError as exc:
                target.reason = exc.message
                target.versions = old
                if isinstance(exc, LoadAbandonedError):
                    log.info("%s", exc.message)  # the operator's doing, not a fault
                else:
                    log.error("model %s failed to load: %s", name, exc.message)
                if scratch is not None:
                    remove_scratch(scratch)
                raise
            finally:
                target.loading = False
            failed = [s.reason for s in loaded.values() if s.state != ModelState.READY]
            serving = any(s.state == ModelState.READY for s in old.values())
            if serving and failed and len(failed) == len(loaded):
                # A reload that loads nothing (a corrupted file...) must not take
                # down the versions that serve now: they stay, as in Triton.
                target.reason = failed[0]
                target.versions = old
                if scratch is not None:
                    remove_scratch(scratch)
                raise ModelLoadError(
                    f"model '{name}' failed to reload: {failed[0]}; "
                    "the version(s) loaded before keep serving"
                )
            old_scratch = target.scratch if target.scratch is not scratch else None
            target.source = source
            target.scratch = scratch
            target.reason = ""
            target.versions = loaded
            if any(s.state == ModelState.READY for s in loaded.values()):
                target.owed = True
            self._refresh_default(name)
            retired = [
                s.model for v, s in old.items() if s.model is not None and loaded.get(v) is not s
            ]
            await self._retire(retired)
            if old_scratch is not None:
                remove_scratch(old_scratch)
            failed = [s.reason for s in loaded.values() if s.state != ModelState.READY]
            if loaded and len(failed) == len(loaded):
                raise ModelLoadError(f"model '{name}' failed to load: {failed[0]}")

    def _plan_versions(
        self, source: ModelSource, config_json: str | None
    ) -> tuple[mc.ModelConfig, dict[int, Path]]:
        """The model's config and the version files to load (reads the disk: in a thread)."""
        if config_json is not None:
            config = parse_config_override(config_json, f"config for model '{source.name}'")
        else:
            config = source.config()
        paths = source.versions(config)
        if not paths:
            raise ModelLoadError(
                f"model '{source.name}' has no version directory with a model file "
                f"(expected {source.directory}/<version>/"
                f"{config.default_model_filename or DEFAULT_MODEL_FILENAME})"
            )
        return config, paths

    def _load_versions(
        self, source: ModelSource, config: mc.ModelConfig, paths: dict[int, Path]
    ) -> dict[int, VersionState]:
        """Load every planned version (blocking: in a thread); failures are kept per version."""
        states: dict[int, VersionState] = {}
        for version, path in sorted(paths.items()):
            try:
                self.lifecycle.check_loading(source.name)
                if is_ensemble(config):
                    model = load_ensemble(
                        source.name,
                        version,
                        config,
                        self.config,
                        self.get,
                        self.lifecycle,
                        self.cache,
                    )
                    states[version] = VersionState(ModelState.READY, model=model)
                    continue
                model = load_version(
                    source.name,
                    version,
                    path,
                    config,
                    self.config,
                    self.lifecycle,
                    self.cache,
                    self._observer,
                )
                states[version] = VersionState(ModelState.READY, model=model)
            except LoadAbandonedError:
                # Versions loaded already would serve nothing: free their instances.
                for state in states.values():
                    if state.model is not None:
                        state.model.close()
                raise
            except LockgateError as exc:
                log.error("model %s version %d failed to load: %s", source.name, version, exc)
                states[version] = VersionState(ModelState.UNAVAILABLE, reason=exc.message)
            except Exception as exc:  # a bug of ours must not take the others down
                log.exception("model %s version %d failed to load", source.name, version)
                states[version] = VersionState(
                    ModelState.UNAVAILABLE, reason=f"internal error: {exc}"
                )
        return states

    async def unload(self, name: str, unload_dependents: bool = False) -> None:
        """Stop routing to ``name``, let its queued work finish, then free it.

        ``unload_dependents`` (Triton's parameter): for an ensemble, also unload
        the models it composes that no other loaded ensemble uses.
        """
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFoundError(f"unknown model '{clip(name)}'")
            models = [s.model for s in entry.versions.values() if s.model is not None]
            for state in entry.versions.values():
                state.state = ModelState.UNLOADING
            self._default.pop(name, None)
            if not models:
                log.info(
                    "unloaded model %s: no version was loaded",
                    name,
                    extra={"event": "model_unloaded", "model": name, "version": ""},
                )
            await self._retire(models)
            for state in entry.versions.values():
                state.state = ModelState.UNAVAILABLE
                state.reason = "unloaded"
                state.model = None
            if entry.scratch is not None:
                remove_scratch(entry.scratch)
                entry.scratch = None
            entry.unloaded = True
            entry.owed = False  # loaded again later, it is a new model
        await self._unload_dependents(name)
        if unload_dependents:
            await self._unload_composing(name)

    async def _unload_composing(self, name: str) -> None:
        entry = self._entries.get(name)
        for model in entry.depends_on if entry is not None else []:
            used = any(
                model in other.depends_on
                and any(s.state == ModelState.READY for s in other.versions.values())
                for other_name, other in self._entries.items()
                if other_name != name
            )
            composing = self._entries.get(model)
            if not used and composing is not None and not composing.unloaded:
                await self.unload(model)

    async def _unload_dependents(self, name: str) -> None:
        """Ensembles over ``name`` cannot serve without it: unload them too (Triton)."""
        for dependent, entry in list(self._entries.items()):
            if name not in entry.depends_on or not any(
                s.state == ModelState.READY for s in entry.versions.values()
            ):
                continue
            await self.unload(dependent)
            entry.orphaned = True
            for state in entry.versions.values():
                state.reason = f"composing model '{name}' was unloaded"

    async def _retire(self, models: list[ModelVersion]) -> None:
        """Drain, close and log each version, all at once: they stopped taking requests together."""
        await asyncio.gather(*(self._retire_one(model) for model in models))

    async def _retire_one(self, model: ModelVersion) -> None:
        started = time.monotonic()
        self._retiring.add(model)
        try:
            await model.drain()
        finally:
            self._retiring.discard(model)
        model.close()
        drained = time.monotonic() - started
        log.info(
            "unloaded model %s version %s: requests in flight drained in %.2f s",
            model.name,
            model.version,
            drained,
            extra={
                "event": "model_unloaded",
                "model": model.name,
                "version": model.version,
                "drain_seconds": round(drained, 3),
            },
        )

    def _refresh_default(self, name: str) -> None:
        entry = self._entries[name]
        ready = [v for v, s in entry.versions.items() if s.state == ModelState.READY and s.model]
        if ready:
            model = entry.versions[max(ready)].model
            assert model is not None
            self._default[name] = model
        else:
            self._default.pop(name, None)

    async def drain(self) -> None:
        """Wait until every model's queue and instances are idle."""
        # Versions being unloaded too: the process must not exit under their batches.
        models = self.ready_models() + list(self._retiring)
        await asyncio.gather(*(m.drain() for m in models))

    def close(self) -> None:
        for model in self.ready_models():
            model.close()
        for entry in self._entries.values():
            if entry.scratch is not None:
                remove_scratch(entry.scratch)


def _ensemble_order(ensembles: dict[str, list[str]]) -> list[str]:
    """Ensembles in an order where nested ones come before those that use them."""
    ordered: list[str] = []
    waiting = dict(ensembles)
    while waiting:
        ready = [n for n, deps in waiting.items() if not any(d in waiting for d in deps)]
        if not ready:  # a cycle between ensembles: each load then names the missing step
            ready = sorted(waiting)
        for name in ready:
            ordered.append(name)
            del waiting[name]
    return ordered


def _is_number(text: str) -> bool:
    # str.isdigit() alone accepts '²', which int() refuses.
    return text.isascii() and text.isdigit()


def _why(entry: ModelEntry) -> str:
    reasons = entry.reason or next((s.reason for s in entry.versions.values() if s.reason), "")
    return f": {reasons}" if reasons else ""
