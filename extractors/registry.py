"""The extractor registry: which extractors run, in what order, and how their values merge.

Built-in extractors are ordinary plugin modules, registered the way an installed plugin is
(datasette's DEFAULT_PLUGINS pattern); installed plugins come from the ``metalake.extractors``
entry-point group and run after the built-ins. See docs/plugins.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pluggy

from extractors import hookspecs
from extractors.source import Source
from metalake.metadata import FIELDS, FLOAT_FIELDS, MetadataDict, check_value

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "metalake.extractors"
# Module names of the built-in extractors, in the order they run.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "extractors.pillow_exif",
    "extractors.exifread_exif",
    "extractors.gps",
)
ALLOW_ENV = "METALAKE_PLUGINS"
BLOCK_ENV = "METALAKE_DISABLE_PLUGINS"
TIMEOUT_ENV = "METALAKE_EXTRACT_TIMEOUT"
DEFAULT_TIMEOUT = 5.0
# Threads of one extractor still running past their time limit; beyond this the extractor is
# skipped until one of them returns, so a plugin that hangs on every file cannot pile up threads.
MAX_STUCK_PER_EXTRACTOR = 4


@dataclass(frozen=True)
class Extraction:
    """What a registry found in one file."""

    values: MetadataDict = field(default_factory=dict)
    """Valid values only, for the fields asked for."""
    sources: dict[str, str] = field(default_factory=dict)
    """Field -> name of the extractor that filled it."""
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(extractor name, message) for each extractor that raised, timed out or returned garbage."""


class PluginInfo(NamedTuple):
    """One loaded extractor, as `metalake plugins` lists it."""

    name: str
    version: str | None
    order: int


class ExtractorTimeoutError(TimeoutError):
    """An extractor ran past its time limit; its thread is abandoned."""


@dataclass
class _Loaded:
    name: str
    plugin: object
    version: str | None


def plugin_name(plugin: object) -> str:
    """A plugin's name: its `NAME` attribute, else its module or class name."""
    name = getattr(plugin, "NAME", None)
    if isinstance(name, str) and name:
        return name
    dunder = getattr(plugin, "__name__", None)
    if isinstance(dunder, str):
        return dunder
    return type(plugin).__name__


def builtin_plugins() -> list[tuple[str, ModuleType]]:
    """The built-in extractor modules, with their names, in order."""
    modules = [importlib.import_module(name) for name in DEFAULT_PLUGINS]
    return [(plugin_name(module), module) for module in modules]


def parse_names(value: str | None) -> frozenset[str] | None:
    """A comma-separated list of names, or None when the variable is unset."""
    if value is None:
        return None
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def parse_timeout(value: str | None) -> float | None:
    """Seconds from `METALAKE_EXTRACT_TIMEOUT`; 0 means no limit (calls run inline)."""
    if value is None or not value.strip():
        return DEFAULT_TIMEOUT
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds >= 0, got {value!r}")
    return seconds or None


class ExtractorRegistry:
    """Ordered extractors and the merge of their results.

    `extract` is synchronous and thread-safe: the server calls it from worker threads.
    """

    def __init__(
        self,
        plugins: Iterable[object | tuple[str, object]] = (),
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        allow: Iterable[str] | None = None,
        block: Iterable[str] = (),
    ) -> None:
        """Register `plugins` (modules or objects, or (name, plugin) pairs) in this order.

        `allow` (when not None) and `block` filter them by name; `timeout` is the per-file time
        limit of each extractor in seconds (None: no limit, calls run inline).
        """
        self.timeout = timeout
        self.load_errors: list[tuple[str, str]] = []
        self._allow = frozenset(allow) if allow is not None else None
        self._block = frozenset(block)
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._loaded: list[_Loaded] = []
        self._runner = _Runner()
        for entry in plugins:
            name, plugin = entry if isinstance(entry, tuple) else (plugin_name(entry), entry)
            self._register(name, plugin, _version_of(plugin))
        self._pm.check_pending()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ExtractorRegistry:
        """Built-ins then installed plugins, with METALAKE_PLUGINS / METALAKE_DISABLE_PLUGINS
        / METALAKE_EXTRACT_TIMEOUT honoured."""
        env = os.environ if environ is None else environ
        allow = parse_names(env.get(ALLOW_ENV))
        block = parse_names(env.get(BLOCK_ENV)) or frozenset()
        registry = cls(
            builtin_plugins(), timeout=parse_timeout(env.get(TIMEOUT_ENV)), allow=allow, block=block
        )
        registry.load_entry_points()
        if allow is not None:
            unknown = allow - {loaded.name for loaded in registry._loaded}
            if unknown:
                log.warning(
                    "%s names extractors that are not installed: %s", ALLOW_ENV, sorted(unknown)
                )
        return registry

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register the installed plugins, after those already registered, sorted by name.

        A blocked plugin is not imported; one that fails to import or to validate is logged,
        recorded in `load_errors` and skipped: a broken plugin must not stop the server.
        """
        for entry_point in sorted(
            importlib.metadata.entry_points(group=group), key=lambda ep: ep.name
        ):
            name = entry_point.name
            if not self._enabled(name) or self._pm.has_plugin(name):
                continue
            try:
                plugin = entry_point.load()
                version = entry_point.dist.version if entry_point.dist else _version_of(plugin)
                self._register(name, plugin, version)
                self._pm.check_pending()
            except Exception as error:
                log.exception("cannot load extractor plugin %r (%s)", name, entry_point.value)
                self.load_errors.append((name, f"{type(error).__name__}: {error}"))
                if self._pm.has_plugin(name):
                    self._pm.unregister(name=name)
                    self._loaded = [loaded for loaded in self._loaded if loaded.name != name]

    def _enabled(self, name: str) -> bool:
        return (self._allow is None or name in self._allow) and name not in self._block

    def _register(self, name: str, plugin: object, version: str | None) -> None:
        if not self._enabled(name):
            return
        self._pm.register(plugin, name=name)
        self._loaded.append(_Loaded(name, plugin, version))

    def _ordered_calls(self) -> list[tuple[str, Callable[..., Any], list[str]]]:
        """Implementations in run order: tryfirst ones, the others, trylast ones; each group in
        registration order (pluggy's own order is the reverse)."""
        rank = {loaded.name: index for index, loaded in enumerate(self._loaded)}
        impls = [
            impl
            for impl in self._pm.hook.metalake_extract_metadata.get_hookimpls()
            if not (impl.hookwrapper or impl.wrapper)
        ]
        impls.sort(
            key=lambda impl: (
                0 if impl.tryfirst else 2 if impl.trylast else 1,
                rank[impl.plugin_name],
            )
        )
        return [(impl.plugin_name, impl.function, list(impl.argnames)) for impl in impls]

    def describe(self) -> list[PluginInfo]:
        """Loaded extractors in run order, numbered from 1."""
        versions = {loaded.name: loaded.version for loaded in self._loaded}
        return [
            PluginInfo(name, versions.get(name), order)
            for order, (name, _, _) in enumerate(self._ordered_calls(), start=1)
        ]

    @property
    def names(self) -> list[str]:
        return [info.name for info in self.describe()]

    def extract(
        self,
        path: str | os.PathLike[str],
        filename: str | None = None,
        missing: Iterable[str] = FIELDS,
    ) -> Extraction:
        """Fill the fields in `missing` from the file at `path`; never raises for the file's
        content (only OSError when the file cannot be opened at all)."""
        wanted = frozenset(missing) & frozenset(FIELDS)
        result = Extraction()
        if not wanted:
            return result
        source = Source(path, filename)
        shown = filename or Path(path).name
        for name, function, argnames in self._ordered_calls():
            remaining = wanted - result.values.keys()
            if not remaining:
                break
            arguments = {"source": source, "missing": remaining}
            call = _bind(function, [arguments[arg] for arg in argnames])
            try:
                produced = self._runner.call(name, call, self.timeout)
            except ExtractorTimeoutError as error:
                log.warning("extractor %r skipped on %s: %s", name, shown, error)
                result.errors.append((name, str(error)))
                continue
            except Exception as error:
                log.warning("extractor %r failed on %s", name, shown, exc_info=True)
                result.errors.append((name, f"{type(error).__name__}: {error}"))
                continue
            problem = _merge(name, produced, remaining, result)
            if problem is not None:
                log.warning("extractor %r on %s: %s", name, shown, problem)
                result.errors.append((name, problem))
        return result


def _bind(function: Callable[..., Any], arguments: list[object]) -> Callable[[], Any]:
    return lambda: function(*arguments)


def _merge(
    name: str, produced: object, remaining: frozenset[str], result: Extraction
) -> str | None:
    """Take the valid values for still-missing fields; say what was wrong with the result, if
    anything was wrong with the result as a whole."""
    if produced is None:
        return None
    if not isinstance(produced, Mapping):
        return f"returned {type(produced).__name__}, not a mapping"
    try:
        items = list(produced.items())
    except Exception as error:
        return f"returned an unreadable mapping: {type(error).__name__}: {error}"
    for key, value in items:
        if key not in remaining or key in result.values:
            continue
        if key in FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if check_value(key, value) is None:
            result.values[key] = value
            result.sources[key] = name
        else:
            log.debug("extractor %r: invalid %s dropped: %r", name, key, value)
    return None


def _version_of(plugin: object) -> str | None:
    for attribute in ("__version__", "VERSION"):
        version = getattr(plugin, attribute, None)
        if isinstance(version, str):
            return version
    module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", None)
    if isinstance(module, str) and module.split(".")[0] == "extractors":
        try:
            return importlib.metadata.version("metalake")
        except importlib.metadata.PackageNotFoundError:
            return None
    return None


class _Job:
    __slots__ = ("done", "error", "function", "key", "result")

    def __init__(self, key: str, function: Callable[[], object]) -> None:
        self.key = key
        self.function = function
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class _Worker(threading.Thread):
    def __init__(self, runner: _Runner) -> None:
        super().__init__(name="metalake-extractor", daemon=True)
        self.runner = runner
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.abandoned = False

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job.result = job.function()
            except BaseException as error:
                job.error = error
            if not self.runner.finished(self, job):
                return


class _Runner:
    """Runs each extractor call on a reusable daemon thread and waits at most the time limit.

    Python cannot kill a thread: a call past its limit is abandoned, its thread left to finish (or
    not) on its own, as a daemon that never blocks interpreter exit. A process per call would be
    killable but costs milliseconds per file; a thread hand-off costs tens of microseconds.
    """

    MAX_IDLE = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._stuck: dict[str, int] = {}

    def call(self, key: str, function: Callable[[], object], timeout: float | None) -> object:
        if timeout is None:
            return function()
        job = _Job(key, function)
        with self._lock:
            stuck = self._stuck.get(key, 0)
            if stuck >= MAX_STUCK_PER_EXTRACTOR:
                raise ExtractorTimeoutError(
                    f"{stuck} earlier calls are still running past the time limit"
                )
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self)
            worker.start()
        worker.jobs.put(job)
        if not job.done.wait(timeout):
            with self._lock:
                if not job.done.is_set():
                    worker.abandoned = True
                    self._stuck[key] = self._stuck.get(key, 0) + 1
                    raise ExtractorTimeoutError(f"timed out after {timeout:g} s")
        if job.error is not None:
            raise job.error
        return job.result

    def finished(self, worker: _Worker, job: _Job) -> bool:
        """Called by a worker when its job returns; False tells the worker to exit."""
        with self._lock:
            job.done.set()
            if worker.abandoned:
                self._stuck[job.key] -= 1
                return False
            if len(self._idle) >= self.MAX_IDLE:
                return False
            self._idle.append(worker)
            return True
