"""Small files stored in turns: uploads whose bytes are all in go on together.

A small file's upload spends most of its CPU in a few hundred microseconds of Python on the event
loop's thread: its SHA-256, its extraction, its catalog row. Run once per file, between gRPC's
receiving of the others, that code ran about twice as slow as back to back: the extractors took
0.29-0.32 ms of thread CPU per bench JPEG inside a loaded server against 0.16 on the same
server's loop when idle (docs/performance-log.md, "Stop 30"). So a small file whose bytes are all in
waits here for others, at most `linger` seconds, and they go on together in the order they
arrived: the loop then runs their steps one after the other, and their catalog adds
reach the group commit together.

An upload with no other under way never waits, and none waits for uploads that cannot come.
"""

from __future__ import annotations

import asyncio


class SmallFileGate:
    """Where small uploads wait for each other (see the module's docstring).

    Every upload announces itself as it starts (`coming`) and leaves when it is over, or as soon
    as it proves large. One whose bytes are all in `arrive`s and, while other uploads are under
    way, waits: the uploads waiting go on once every upload under way is waiting (none is left
    to bring a file: a client that keeps some files in flight sends the next ones only once
    these are answered), once `most` of them wait, or `linger` seconds after the first arrived,
    whichever comes first.
    """

    def __init__(self, *, linger: float, most: int) -> None:
        self._linger = linger
        self._most = most
        self._under_way = 0
        self._waiting: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def coming(self) -> Coming:
        """Announce an upload, under way until it leaves (see Coming)."""
        return Coming(self)

    def _arrive(self) -> asyncio.Future[None] | None:
        """One upload's bytes are in: what it waits for, or None when it goes on at once."""
        if self._under_way == 1 and not self._waiting:
            return None  # alone: no future, no timer
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()
        self._waiting.append(arrived)
        if len(self._waiting) >= min(self._under_way, self._most):
            self._open()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger, self._open)
        return arrived

    def _leave(self) -> None:
        self._under_way -= 1
        if self._waiting and len(self._waiting) >= self._under_way:
            self._open()

    def _open(self) -> None:
        """Let every upload waiting go on, in the order they arrived."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        for arrived in waiting:
            if not arrived.done():  # not cancelled meanwhile (its client went away)
                arrived.set_result(None)


class Coming:
    """An upload announced to a SmallFileGate: it `arrive`s once its bytes are all in, and
    leaves the gate's count when the `with` ends, or earlier by `leave` (a large file: it will
    not arrive)."""

    __slots__ = ("_arrived", "_gate", "_left")

    def __init__(self, gate: SmallFileGate) -> None:
        self._gate = gate
        self._arrived = False
        self._left = False
        gate._under_way += 1

    async def arrive(self) -> None:
        """Wait for the other uploads under way (see SmallFileGate); at most once."""
        if self._arrived or self._left:
            return
        self._arrived = True
        arrived = self._gate._arrive()
        if arrived is None:
            return
        if arrived.done():
            # The gate opened on this arrival: go on after those that waited, not before them.
            await asyncio.sleep(0)
        else:
            await arrived

    def leave(self) -> None:
        if not self._left:
            self._left = True
            self._gate._leave()

    def __enter__(self) -> Coming:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.leave()
