"""Decoding clients' images in processes of their own.

Previews and image hashes decode a client's bytes with C libraries (libjpeg, libpng, libtiff,
libheif, OpenJPEG, LibRaw). A crash there, a decoder's bug met by a crafted file, would end the
whole server, and the background hasher, which takes unhashed items in order, would meet the
same file again after each restart. Here that work runs in a pool of spawned processes: a crash
ends one of them, the pool is replaced, and the file gets no preview or hash (`DecoderCrashed`).

Work that was in the pool beside the crash fails with it (concurrent.futures breaks the whole
pool), and nothing tells which work crashed: each is tried once more, alone in a process of its
own, so that only the file that crashes its decoder goes without.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger(__name__)

# Seconds without work after which the decoder processes stop; the next work starts them again
# (a spawn costs about half a second, once).
IDLE_AFTER = 60.0

_T = TypeVar("_T")


class DecoderCrashed(Exception):
    """A decoder process died on this work, twice."""


class Decoders:
    """A pool of `processes` decoder processes, started on first use and replaced after a crash.

    Spawned, not forked, as the server's workers are: nothing of the server (gRPC, database
    connections, threads) is copied into them.
    """

    def __init__(self, processes: int | None = None, *, idle_after: float = IDLE_AFTER) -> None:
        self._processes = processes or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._idle_after = idle_after
        self._running = 0
        self._idle: asyncio.TimerHandle | None = None

    async def run(self, function: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """`function(*args, **kwargs)` in a decoder process: it, its arguments and its result
        must pickle. Its exceptions are raised here; DecoderCrashed if its process died."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._running += 1
        try:
            return await self._run(functools.partial(function, *args, **kwargs), function, args)
        finally:
            self._running -= 1
            if not self._running and self._pool is not None:
                # Idle processes hold memory (Pillow and its codecs, tens of MB each).
                loop = asyncio.get_running_loop()
                self._idle = loop.call_later(self._idle_after, self.close)

    async def _run(
        self, call: Callable[[], _T], function: Callable[..., Any], args: tuple[Any, ...]
    ) -> _T:
        loop = asyncio.get_running_loop()
        pool = self._pool or self._start()
        try:
            return await loop.run_in_executor(pool, call)
        except BrokenProcessPool:
            if self._pool is pool:  # not replaced yet by another caller
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
        # This work crashed its process, or was beside the work that did: again, alone.
        alone = _spawned_pool(1)
        try:
            return await loop.run_in_executor(alone, call)
        except BrokenProcessPool:
            crashed = f"a decoder process died on {_describe(function, args)}"
            log.warning(crashed)
            raise DecoderCrashed(crashed) from None
        finally:
            alone.shutdown(wait=False)

    def _start(self) -> ProcessPoolExecutor:
        self._pool = _spawned_pool(self._processes)
        return self._pool

    def close(self) -> None:
        """Stop the decoder processes; work still queued is cancelled."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _spawned_pool(processes: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_decoder,
        initargs=(os.getpid(),),
    )


def _start_decoder(server: int) -> None:
    """In a new decoder process: end with the server, however it ends (a decoder process
    left behind would hold its memory for nothing), and log as the server does (its
    environment and its stderr are the server's), so that what Pillow logs or warns about a
    file is a JSON line like the server's own, shown at the same levels, not raw text."""
    die_with(server)
    from metalake.server.observability import configure_logging

    configure_logging()


def die_with(parent: int) -> None:
    """Be killed when process `parent` (this one's parent) ends, even by SIGKILL. Linux only
    (prctl); elsewhere this process outlives a killed parent."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before prctl took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def _describe(function: Callable[..., Any], args: tuple[Any, ...]) -> str:
    name = getattr(function, "__qualname__", repr(function))
    shown = ", ".join(f"{len(arg)} bytes" if isinstance(arg, bytes) else repr(arg) for arg in args)
    return f"{name}({shown})"
