"""Keyed asyncio locks: one lock per key, kept only while someone holds or waits for it."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class KeyedLocks:
    """One holder per key at a time among asyncio tasks; nothing is kept for a key nobody
    holds or waits for.

    Taken once per upload, so a free key costs a dict entry and nothing else: no lock object,
    no future, no generator. Waiters are served in the order they came.
    """

    def __init__(self) -> None:
        # A key held -> the futures of its waiters, first come first.
        self._held: dict[str, list[asyncio.Future[None]]] = {}

    def hold(self, key: str) -> KeyHold:
        """`async with locks.hold(key):` runs its body while no other holder of `key` does."""
        return KeyHold(self, key)

    async def acquire(self, key: str) -> None:
        waiters = self._held.get(key)
        if waiters is None:
            self._held[key] = []
            return
        turn = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.cancelled():
                with contextlib.suppress(ValueError):
                    waiters.remove(turn)
            else:
                # The key was handed over just as this waiter was cancelled: hand it on.
                self.release(key)
            raise

    def release(self, key: str) -> None:
        waiters = self._held[key]
        while waiters:
            turn = waiters.pop(0)
            if not turn.done():  # a waiter cancelled meanwhile has left
                turn.set_result(None)
                return
        del self._held[key]


class KeyHold:
    """Holding one key of KeyedLocks, as an async context manager."""

    __slots__ = ("_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._key)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._locks.release(self._key)
