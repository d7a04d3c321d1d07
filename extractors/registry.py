"""The extractor registry: which extractors run, in what order, and how their values merge.

Built-in extractors are ordinary plugin modules, registered the way an installed plugin is
(datasette's DEFAULT_PLUGINS pattern); installed plugins come from the ``metalake.extractors``
entry-point group and run after the built-ins. See docs/plugins.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.metadata
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import pluggy

from metalake import plugin as hookspecs  # the hooks are specified in the plugin API
from metalake.extractors import interrupt
from metalake.extractors.source import Source
from metalake.metadata import FIELDS, FLOAT_FIELDS, MetadataDict, check_value

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "metalake.extractors"
HOOK = "metalake_extract_metadata"
# Module names of the built-in extractors, in the order they run.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "metalake.extractors.pillow_exif",
    "metalake.extractors.exifread_exif",
    "metalake.extractors.gps",
    "metalake.extractors.xmp",
)
ALLOW_ENV = "METALAKE_PLUGINS"
BLOCK_ENV = "METALAKE_DISABLE_PLUGINS"
TIMEOUT_ENV = "METALAKE_EXTRACT_TIMEOUT"
DEFAULT_TIMEOUT = 5.0
# Threads of one extractor still running past their time limit; beyond this the extractor is
# skipped until one of them returns, so a plugin that hangs on every file cannot pile up threads.
MAX_STUCK_PER_EXTRACTOR = 4
# Seconds the trusted extractors may run on the event loop's thread for one file (see
# `extract_async`) before the one running is interrupted and run again on a runner thread: far
# above what a camera file's metadata takes (well under a millisecond), short enough that a
# hostile file stalls the loop little.
INLINE_BUDGET = 0.05
_FIELD_SET = frozenset(FIELDS)


@dataclass(frozen=True)
class Extraction:
    """What a registry found in one file."""

    values: MetadataDict = field(default_factory=dict)
    """Valid values only, for the fields asked for."""
    sources: dict[str, str] = field(default_factory=dict)
    """Field -> name of the extractor that filled it."""
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(extractor name, message) for each extractor that raised, timed out or returned garbage."""
    timings: dict[str, float] = field(default_factory=dict)
    """Extractor name -> seconds it ran on this file (those that returned)."""


class PluginInfo(NamedTuple):
    """One loaded plugin, as `metalake plugins` lists it: an extractor (numbered in run order
    from 1) or a wrapper around every extractor call (order 0)."""

    name: str
    version: str | None
    order: int
    kind: str = "extractor"


class _Call(NamedTuple):
    """One extractor, called through pluggy with every wrapper around it."""

    name: str
    hook: Callable[..., Any]
    # Without wrappers: the extractor's function called with (source, missing), its result as
    # it returned it (see `_run_inline`).
    direct: Callable[[Source, frozenset[str]], object] | None = None


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
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
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
        trusted: Iterable[str] = (),
    ) -> None:
        """Register `plugins` (modules or objects, or (name, plugin) pairs) in this order.

        `allow` (when not None) and `block` filter them by name; `timeout` is the per-file time
        limit of each extractor in seconds (None: no limit, calls run inline). `trusted` names
        extractors that may run on an event loop's thread (see `extract_async`).
        """
        self.timeout = timeout
        self.trusted = frozenset(trusted)
        self.load_errors: list[tuple[str, str]] = []
        self._allow = frozenset(allow) if allow is not None else None
        self._block = frozenset(block)
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._loaded: list[_Loaded] = []
        self._calls: list[_Call] | None = None
        self._inline_calls = 0
        self._runner = _Runner()
        # In-memory files whose inline calls wait for the loop's next turn, and that loop.
        self._round: list[_InlineFile] = []
        self._round_loop: asyncio.AbstractEventLoop | None = None
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
        builtins = builtin_plugins()
        registry = cls(
            builtins,
            timeout=parse_timeout(env.get(TIMEOUT_ENV)),
            allow=allow,
            block=block,
            trusted=[name for name, _ in builtins],
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
                    self._calls = None

    def _enabled(self, name: str) -> bool:
        return (self._allow is None or name in self._allow) and name not in self._block

    def _register(self, name: str, plugin: object, version: str | None) -> None:
        if not self._enabled(name):
            return
        self._pm.register(plugin, name=name)
        self._loaded.append(_Loaded(name, plugin, version))
        self._calls = None

    def _impls(self) -> tuple[list[pluggy.HookImpl], list[pluggy.HookImpl]]:
        """(extractors in run order, wrappers). Run order: tryfirst ones, the others, trylast
        ones; each group in registration order (pluggy's own order is the reverse)."""
        rank = {loaded.name: index for index, loaded in enumerate(self._loaded)}
        impls = self._pm.hook.metalake_extract_metadata.get_hookimpls()
        wrappers = [impl for impl in impls if impl.hookwrapper or impl.wrapper]
        extractors = [impl for impl in impls if not (impl.hookwrapper or impl.wrapper)]
        extractors.sort(
            key=lambda impl: (
                0 if impl.tryfirst else 2 if impl.trylast else 1,
                rank[impl.plugin_name],
            )
        )
        return extractors, wrappers

    def _ordered_calls(self) -> list[_Call]:
        """One call per extractor, in run order, returning pluggy's list of results.

        With wrappers, each is a pluggy hook caller holding that one extractor and every wrapper
        (new-style `wrapper=True` and old-style `hookwrapper=True`), so pluggy runs the wrappers
        around each extractor call as it would around a whole hook call, while the registry
        keeps what pluggy's single call cannot: a time limit and a `metadata_sources` name per
        extractor. Without wrappers (the usual case), the extractor's function is called as
        pluggy's own loop calls it (`_direct`): pluggy validated it when it was registered, and
        its per-call checks and subset filtering cost as much as a small extractor's work.
        """
        calls = self._calls
        if calls is None:
            extractors, wrappers = self._impls()
            plugins = {impl.plugin_name: impl.plugin for impl in extractors}
            calls = [
                _Call(
                    impl.plugin_name,
                    self._pm.subset_hook_caller(
                        HOOK,
                        remove_plugins=[p for n, p in plugins.items() if n != impl.plugin_name],
                    ),
                )
                if wrappers
                else _Call(impl.plugin_name, _direct(impl), _positional(impl))
                for impl in extractors
            ]
            # The leading trusted extractors, unless a wrapper (whose code is not) runs around
            # every call.
            inline = 0
            if not wrappers:
                while inline < len(calls) and calls[inline].name in self.trusted:
                    inline += 1
            self._calls, self._inline_calls = calls, inline
        return calls

    def describe(self) -> list[PluginInfo]:
        """Loaded wrappers (order 0), then extractors in run order, numbered from 1."""
        versions = {loaded.name: loaded.version for loaded in self._loaded}
        extractors, wrappers = self._impls()
        return [
            PluginInfo(impl.plugin_name, versions.get(impl.plugin_name), 0, "wrapper")
            for impl in wrappers
        ] + [
            PluginInfo(impl.plugin_name, versions.get(impl.plugin_name), order)
            for order, impl in enumerate(extractors, start=1)
        ]

    @property
    def names(self) -> list[str]:
        """The extractors' names, in run order."""
        return [info.name for info in self.describe() if info.kind == "extractor"]

    def extract(
        self,
        path: str | os.PathLike[str],
        filename: str | None = None,
        missing: Iterable[str] = FIELDS,
    ) -> Extraction:
        """Fill the fields in `missing` from the file at `path`; never raises for the file's
        content (only OSError when the file cannot be opened at all)."""
        wanted = _FIELD_SET.intersection(missing)
        if not wanted:
            return Extraction()
        return self._extract(Source(path, filename), wanted, filename or Path(path).name)

    def extract_data(
        self, data: bytes, filename: str | None = None, missing: Iterable[str] = FIELDS
    ) -> Extraction:
        """`extract` for a file whose bytes are in memory already: nothing is read from disk."""
        wanted = _FIELD_SET.intersection(missing)
        if not wanted:
            return Extraction()
        return self._extract(Source(None, filename, data=data), wanted, filename or "<memory>")

    def _extract(self, source: Source, wanted: frozenset[str], shown: str) -> Extraction:
        result = Extraction()
        chain = _Chain(self._ordered_calls(), source, wanted, result, shown)
        if self.timeout is None:
            chain.run(0)
        else:
            self._runner.run_with_time_limit(chain, self.timeout)
        return result

    async def extract_async(
        self,
        content: bytes | str | os.PathLike[str],
        *,
        filename: str | None = None,
        missing: Iterable[str] = FIELDS,
        time_limit: float | None = None,
    ) -> Extraction:
        """`extract_data` (for bytes) or `extract` (for a path), awaited on an event loop.

        `time_limit`: seconds for the whole file, after which TimeoutError is raised (each
        extractor's own limit, `timeout`, applies too). Only a runner thread's part can be
        waited for past it: the timer is set only when there is one, the common small file
        done inline needs none (setting and cancelling an asyncio timer cost 5 us a file).

        Bytes in memory (a small file) go first to the leading trusted extractors, called right
        here on the loop's thread: they do no I/O, and the hand-off to a runner thread and back
        cost about as much as they do (0.1-0.2 ms per camera JPEG). Python cannot stop a thread
        but can interrupt its main thread, so this happens only there (`interrupt`): the call
        still running when the file's INLINE_BUDGET is spent is interrupted and made again, on
        a fresh reading of the bytes, by a runner thread, where the time limit applies. A
        hostile file stalls the loop for about the budget, and its values are still extracted
        as well as they can be. The files that reach this point in one turn of the loop (a
        server's small uploads that go on together, see server/ingest/gate.py) are extracted
        one after the other, at the loop's next turn (`_inline_round`).

        The rest of the chain (or all of it, for a spooled file) goes to a runner thread, which
        wakes the loop once when it is done; the time limit is an asyncio timer, not a thread
        blocked in a wait. The file is opened on the runner thread, never on the loop.
        Cancelled, the chain is abandoned after its current call.
        """
        wanted = _FIELD_SET.intersection(missing)
        if not wanted:
            return Extraction()
        deadline = None if time_limit is None else asyncio.get_running_loop().time() + time_limit
        calls = self._ordered_calls()
        result = Extraction()
        start = 0
        if isinstance(content, bytes):
            opener = functools.partial(Source, None, filename, data=content)
            shown = filename or "<memory>"
            if self._inline_calls and interrupt.available():
                left_at = await self._inline_round(
                    _InlineFile(opener(), wanted, result, shown, calls[: self._inline_calls])
                )
                if left_at is None or left_at == len(calls):
                    return result
                start = left_at
        else:
            opener = functools.partial(Source, content, filename)
            shown = filename or Path(content).name
        # A source of its own: an interrupted extractor may have left the first one half read.
        chain = _Chain(calls, None, wanted, result, shown, opener)
        async with asyncio.timeout_at(deadline):  # None: no deadline
            await self._runner.run_async(chain, self.timeout, start)
        return result

    def _inline_round(self, file: _InlineFile) -> asyncio.Future[int | None]:
        """`_run_inline` for `file` at the loop's next turn, with every other file that comes
        before it: what `_run_inline` returns.

        Why not at once: the same extractors run for several files back to back cost less than
        run once per file between other work (a loaded server's extractions took 0.29-0.32 ms
        of thread CPU per bench JPEG, 0.16 on its idle loop, and 0.22-0.27 in rounds of about
        four files: docs/performance-log.md, "Stop 30"). A file alone waits one turn.
        """
        loop = asyncio.get_running_loop()
        file.done = loop.create_future()
        if not self._round or self._round_loop is not loop:
            # A round left behind by a loop that is gone (a closed test loop) is dropped.
            self._round, self._round_loop = [], loop
            loop.call_soon(self._run_round)
        self._round.append(file)
        return file.done

    def _run_round(self) -> None:
        files, self._round = self._round, []
        for file in files:
            if file.done.cancelled():
                continue  # its upload was cancelled meanwhile
            try:
                left_at = _run_inline(
                    file.calls,
                    file.source,
                    file.wanted,
                    file.result,
                    file.shown,
                    self._runner.stuck,
                )
            except Exception as error:  # a bug of ours: that file's extraction fails alone
                file.done.set_exception(error)
            else:
                file.done.set_result(left_at)


@dataclass(eq=False)
class _InlineFile:
    """One in-memory file waiting for its inline calls (see ExtractorRegistry._inline_round)."""

    source: Source
    wanted: frozenset[str]
    result: Extraction
    shown: str
    calls: list[_Call]
    done: asyncio.Future[int | None] = field(init=False)


def _direct(impl: pluggy.HookImpl) -> Callable[..., list[object]]:
    """One extractor called as pluggy's hook loop calls an implementation: with the arguments
    it names, its result (unless None) as the one item of a list."""
    positional = _positional(impl)

    def call(*, source: Source, missing: frozenset[str]) -> list[object]:
        result = positional(source, missing)
        return [] if result is None else [result]

    return call


def _positional(impl: pluggy.HookImpl) -> Callable[[Source, frozenset[str]], object]:
    """One extractor's function as `_run_inline` calls it: with (source, missing), whichever of
    them it names, in its order; what it returns, unwrapped."""
    function, argnames = impl.function, impl.argnames
    if argnames == ("source", "missing"):  # every built-in extractor
        return function

    def call(source: Source, missing: frozenset[str]) -> object:
        given = {"source": source, "missing": missing}
        return function(*[given[name] for name in argnames])

    return call


def _run_inline(
    calls: list[_Call],
    source: Source,
    wanted: frozenset[str],
    result: Extraction,
    shown: str,
    stuck: Mapping[str, int],
) -> int | None:
    """`calls` (direct ones) on this thread, the main one (see `interrupt`), all of them in
    INLINE_BUDGET seconds, the one running when they are spent interrupted: the index of the
    call to go on from elsewhere (that one, or the first after `calls`), or None when no field
    is left to fill.

    What a `_Chain` does for one call, without its thread-safety: a small file's extractors run
    here once per upload, on the event loop's thread, and the chain's objects and the
    keyword-argument plumbing of pluggy-style calls cost a sizeable part of what the extractors
    themselves do."""
    with interrupt.budget(INLINE_BUDGET):  # one timer for all of them
        for index, (name, _, direct) in enumerate(calls):
            remaining = wanted.difference(result.values)
            if not remaining:
                return None
            too_many = _too_many_stuck(stuck, name)
            if too_many is not None:
                _record(result, name, shown, too_many, traceback=False)
                continue
            assert direct is not None  # calls run inline only without wrappers
            started = time.monotonic()
            try:
                produced = interrupt.run(direct, source, remaining)
                error: Exception | None = None
            except interrupt.OverBudget:
                log.warning(
                    "the event loop's %g s for %s were spent with extractor %r to run: it "
                    "runs on a worker thread",
                    INLINE_BUDGET,
                    shown,
                    name,
                )
                return index
            except Exception as caught:
                produced, error = None, caught
            outcome = [] if produced is None else [produced]  # as pluggy's call returns it
            _take(result, name, shown, time.monotonic() - started, outcome, error, remaining)
    return len(calls) if wanted.difference(result.values) else None


class _Chain:
    """One file's extractors, run in order on one thread, merging as they go.

    The caller watches each extractor's start time; when one overruns, the chain is abandoned
    (the thread stops after that call returns, and its result is ignored) and the caller resumes
    the rest on another thread. One thread hand-off per file, not one per extractor.
    """

    def __init__(
        self,
        calls: list[_Call],
        source: Source | None,
        wanted: frozenset[str],
        result: Extraction,
        shown: str,
        opener: Callable[[], Source] | None = None,
    ) -> None:
        """`source`, or None with `opener`, which the chain's thread calls first."""
        self.calls = calls
        self.source = source
        self.opener = opener
        self.wanted = wanted
        self.result = result
        self.shown = shown
        self.condition = threading.Condition()
        self.current: int | None = None
        self.started_at = 0.0
        self.done = False
        self.abandoned = False
        self.stuck: dict[str, int] | None = None
        # The extractor whose stuck thread the watcher counted when it abandoned this chain.
        self.stuck_name: str | None = None
        # Why the file could not be opened at all (see `opener`).
        self.failure: Exception | None = None
        # Called, under the condition, once the chain is done (an asyncio watcher's wake-up).
        self.on_done: Callable[[], object] | None = None

    def after_overrun(self, index: int, limit: float) -> _Chain:
        """Record that call `index` ran past `limit`; a new chain over the same file and result
        for the extractors after it (this one still belongs to the stuck thread)."""
        self._record(self.calls[index][0], f"timed out after {limit:g} s", traceback=False)
        return _Chain(self.calls, self.source, self.wanted, self.result, self.shown, self.opener)

    def run(self, start: int) -> None:
        if self.source is None:
            try:
                assert self.opener is not None
                self.source = self.opener()
            except Exception as failure:
                with self.condition:
                    self.failure = failure
                    self._finish()
                return
        for index in range(start, len(self.calls)):
            name, hook, _ = self.calls[index]
            with self.condition:
                if self.abandoned:
                    return
                remaining = self._remaining(name)
                if remaining is None:
                    continue
                if not remaining:
                    break
                # No notify: the watcher re-reads the start time when its wait for the last
                # deadline ends, so the common case costs one wake-up per file, not one per call.
                self.current, self.started_at = index, time.monotonic()
            try:
                # pluggy's call: wrappers run around the extractor, and its result (if not None)
                # comes back as the one item of a list, which wrappers may have replaced.
                produced = hook(source=self.source, missing=remaining)
                error: Exception | None = None
            except Exception as caught:
                produced, error = None, caught
            with self.condition:
                if self.abandoned:
                    return
                self._take(name, produced, error, remaining)
        with self.condition:
            self._finish()

    def _remaining(self, name: str) -> frozenset[str] | None:
        """The fields still missing, for extractor `name` to fill; None when it is skipped."""
        remaining = self.wanted.difference(self.result.values)
        if not remaining or self.stuck is None:
            return remaining
        too_many = _too_many_stuck(self.stuck, name)
        if too_many is not None:
            self._record(name, too_many, traceback=False)
            return None
        return remaining

    def _take(
        self, name: str, produced: object, error: Exception | None, remaining: frozenset[str]
    ) -> None:
        seconds = time.monotonic() - self.started_at
        _take(self.result, name, self.shown, seconds, produced, error, remaining)

    def _finish(self) -> None:
        """Under the condition: the chain is over, wake a thread waiting on it (an event loop
        watching it is woken by the runner once its thread is done with the chain)."""
        self.done = True
        self.condition.notify_all()

    def wake_watcher(self) -> None:
        """Wake the event loop watching this chain, if one does and still waits for it.

        Called by the chain's thread once it is done with the chain and holds no lock, as the
        last thing before it waits for its next job: the loop woken then runs without finding
        that thread still busy (under the condition, or holding the GIL for its book-keeping).
        """
        if self.on_done is not None and not self.abandoned:
            # RuntimeError: the watcher's event loop is closed, there is nobody to wake.
            with contextlib.suppress(RuntimeError):
                self.on_done()

    def _record(self, name: str, message: str, *, traceback: bool | BaseException) -> None:
        _record(self.result, name, self.shown, message, traceback=traceback)


def _take(
    result: Extraction,
    name: str,
    shown: str,
    seconds: float,
    produced: object,
    error: Exception | None,
    remaining: frozenset[str],
) -> None:
    """Merge what extractor `name` produced (a list, as pluggy's call returns it) in `seconds`,
    or record what went wrong."""
    result.timings[name] = seconds
    if error is not None:
        _record(result, name, shown, f"{type(error).__name__}: {error}", traceback=error)
    else:
        problem = _merge(name, produced, remaining, result)
        if problem is not None:
            _record(result, name, shown, problem, traceback=False)


def _too_many_stuck(stuck: Mapping[str, int], name: str) -> str | None:
    """Why extractor `name` is skipped for now, if too many of its calls are still running."""
    count = stuck.get(name, 0)
    if count < MAX_STUCK_PER_EXTRACTOR:
        return None
    return f"{count} earlier calls still running past the time limit"


def _record(
    result: Extraction, name: str, shown: str, message: str, *, traceback: bool | BaseException
) -> None:
    """Why extractor `name` gave nothing for file `shown`: logged, and kept in `result`."""
    log.warning("extractor %r skipped on %s: %s", name, shown, message, exc_info=traceback)
    result.errors.append((name, message))


def _merge(
    name: str, produced: object, remaining: frozenset[str], result: Extraction
) -> str | None:
    """Take the valid values for still-missing fields from what pluggy's call returned (a list
    of the extractor's results); say what was wrong with a result, if anything was."""
    if not isinstance(produced, list):
        return f"a wrapper returned {type(produced).__name__}, not a list of results"
    for item in produced:
        problem = _merge_one(name, item, remaining, result)
        if problem is not None:
            return problem
    return None


def _merge_one(
    name: str, produced: object, remaining: frozenset[str], result: Extraction
) -> str | None:
    if produced is None:
        return None
    # A dict (what extractors return) first: isinstance against the Mapping ABC costs more.
    if type(produced) is not dict and not isinstance(produced, Mapping):
        return f"returned {type(produced).__name__}, not a mapping"
    try:
        items = list(produced.items())
    except Exception as error:
        return f"returned an unreadable mapping: {type(error).__name__}: {error}"
    for key, value in items:
        if key not in remaining or key in result.values:
            continue
        source = name
        if isinstance(value, hookspecs.Derived):
            source, value = f"{name}+{value.how}", value.value
        if key in FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if check_value(key, value) is None:
            result.values[key] = value
            result.sources[key] = source
        else:
            log.debug("extractor %r: invalid %s dropped: %r", name, key, value)
    return None


def _version_of(plugin: object) -> str | None:
    for attribute in ("__version__", "VERSION"):
        version = getattr(plugin, attribute, None)
        if isinstance(version, str):
            return version
    module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", None)
    if isinstance(module, str) and module.startswith("metalake.extractors."):
        try:
            return importlib.metadata.version("metalake")
        except importlib.metadata.PackageNotFoundError:
            return None
    return None


class _Worker(threading.Thread):
    def __init__(self, runner: _Runner) -> None:
        super().__init__(name="metalake-extractor", daemon=True)
        self.runner = runner
        # A job returns what to call once its thread is idle again (an event loop's wake-up).
        self.jobs: queue.SimpleQueue[Callable[[], Callable[[], None] | None]] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            wake = self.jobs.get()()
            idle = self.runner.idle(self)
            if wake is not None:
                # Last: the loop it wakes must not find this thread still at work.
                wake()
            if not idle:
                return


class _Runner:
    """Runs each file's extractor chain on a reusable daemon thread, under a time limit.

    Python cannot kill a thread: an extractor past its limit is abandoned, its thread left to
    finish (or not) on its own, as a daemon that never blocks interpreter exit. A process per file
    would be killable but costs milliseconds; a thread hand-off costs tens of microseconds.
    """

    MAX_IDLE = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self.stuck: dict[str, int] = {}

    def submit(self, job: Callable[[], Callable[[], None] | None]) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self)
            worker.start()
        worker.jobs.put(job)

    def idle(self, worker: _Worker) -> bool:
        """A worker is free again; False tells it to exit."""
        with self._lock:
            if len(self._idle) >= self.MAX_IDLE:
                return False
            self._idle.append(worker)
            return True

    def run_with_time_limit(self, chain: _Chain, timeout: float) -> None:
        start = 0
        while start < len(chain.calls):
            overrun = self._watch(chain, start, timeout)
            if overrun is None:
                return
            chain = chain.after_overrun(overrun, timeout)
            start = overrun + 1

    def _watch(self, chain: _Chain, start: int, timeout: float) -> int | None:
        """Run the chain from `start`; the index of the extractor that overran, if one did."""
        chain.stuck = self.stuck
        self.submit(lambda: self._run(chain, start))
        with chain.condition:
            while not chain.done:
                deadline = chain.started_at if chain.current is not None else time.monotonic()
                left = deadline + timeout - time.monotonic()
                if left <= 0 and chain.current is not None:
                    return self._abandon(chain, chain.current)
                chain.condition.wait(max(left, 0.001))
        if chain.failure is not None:
            raise chain.failure
        return None

    async def run_async(self, chain: _Chain, limit: float | None, start: int = 0) -> None:
        """`run_with_time_limit` for a caller on an event loop (None: no time limit), from
        call `start`."""
        while start < len(chain.calls):
            overrun = await self._watch_async(chain, start, limit)
            if overrun is None:
                return
            assert limit is not None  # without a limit nothing overruns
            chain = chain.after_overrun(overrun, limit)
            start = overrun + 1

    async def _watch_async(self, chain: _Chain, start: int, limit: float | None) -> int | None:
        """`_watch` without a blocked thread: the chain's thread wakes the loop when it is done,
        a timer when the extractor running now may have overrun."""
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        chain.stuck = self.stuck
        chain.on_done = functools.partial(loop.call_soon_threadsafe, _wake, woken)
        self.submit(functools.partial(self._run, chain, start))
        left = limit
        try:
            while True:
                timer = None if left is None else loop.call_later(left, _wake, woken)
                try:
                    await woken
                finally:
                    if timer is not None:
                        timer.cancel()
                if chain.done:
                    # Set under the condition before the chain's thread woke us: nothing left
                    # to decide, and no lock to take from a thread that may still hold it.
                    break
                with chain.condition:
                    if chain.done:
                        break
                    assert limit is not None  # without a limit only the chain wakes us
                    deadline = chain.started_at if chain.current is not None else time.monotonic()
                    left = deadline + limit - time.monotonic()
                    if left <= 0 and chain.current is not None:
                        return self._abandon(chain, chain.current)
                    left = max(left, 0.001)
                    woken = loop.create_future()
                    chain.on_done = functools.partial(loop.call_soon_threadsafe, _wake, woken)
        except asyncio.CancelledError:
            with chain.condition:
                # Nobody waits for the rest: stop after the current call (not counted as stuck).
                chain.abandoned = True
            raise
        if chain.failure is not None:
            raise chain.failure
        return None

    def _abandon(self, chain: _Chain, index: int) -> int:
        """Under the chain's condition: give up the chain whose call `index` overran."""
        chain.abandoned = True
        name = chain.stuck_name = chain.calls[index][0]
        with self._lock:
            self.stuck[name] = self.stuck.get(name, 0) + 1
        return index

    def _run(self, chain: _Chain, start: int) -> Callable[[], None]:
        """Run the chain; what wakes its watcher (see `_Worker.run`)."""
        chain.run(start)
        # No lock needed: a chain is abandoned (and `stuck_name` set) only while it is not done,
        # under the condition, and `run` returns only after taking the condition once more.
        name = chain.stuck_name
        if name is not None:
            # The abandoned call has returned at last: one fewer stuck thread for its extractor.
            with self._lock:
                self.stuck[name] -= 1
        return chain.wake_watcher


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
