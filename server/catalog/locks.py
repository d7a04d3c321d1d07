"""Holding a blob key across every server sharing the catalog, between deciding a blob is
unused and deleting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, TypeVar

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from metalake.server.catalog.database import SqlDatabase, _connect_defaults, _sqlite_file
from metalake.server.catalog.items import _each_waiter
from metalake.server.locks import KeyedLocks
from metalake.server.sqlitelocks import BlobLocks

log = logging.getLogger(__name__)

_R = TypeVar("_R")


class BlobHolds(Protocol):
    """Exclusive use of a blob key, within this process and across every server sharing the
    catalog."""

    def hold_blob(self, blob_key: str) -> AbstractAsyncContextManager[None]: ...


class SqlBlobHolds(SqlDatabase):
    """Blob holds for every server sharing the catalog's database."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # On a SQLite file, blob holds are file locks, shared by the server's worker processes
        # (see sqlitelocks); on PostgreSQL, session advisory locks.
        self._blob_file_locks: BlobLocks | None = None
        if engine.dialect.name == "sqlite":
            database = _sqlite_file(engine)
            self._blob_file_locks = BlobLocks(database) if database else None
        self._blob_locks = _AdvisoryLocks(engine) if engine.dialect.name == "postgresql" else None
        self._process_locks = KeyedLocks()

    def hold_blob(self, blob_key: str) -> AbstractAsyncContextManager[None]:
        """Exclusive use of a blob key, among this process's tasks and across every server
        sharing this catalog: between deciding a blob is unused and deleting it, nobody may
        commit the same content.

        On PostgreSQL, a session advisory lock (see _AdvisoryLocks). On a SQLite file, a file
        lock (the processes sharing it are one server's workers; see sqlitelocks.BlobLocks).
        On a catalog in memory, which no other process can share, an asyncio lock.
        """
        if self._blob_locks is not None:
            return self._blob_locks.hold(int(blob_key[:15], 16))
        if self._blob_file_locks is not None:
            return self._blob_file_locks.hold(blob_key)
        return self._process_locks.hold(blob_key)

    async def close(self) -> None:
        if self._blob_locks is not None:
            await asyncio.to_thread(self._blob_locks.close)
        if self._blob_file_locks is not None:
            self._blob_file_locks.close()
        await super().close()


# Many locks taken (released) in one statement: one round trip, one worker thread hop, for
# every holder that asked meanwhile. WITH ORDINALITY keeps the answers in the order asked.
_TRY_LOCKS = text(
    "SELECT pg_try_advisory_lock(id) FROM unnest(CAST(:ids AS bigint[])) WITH ORDINALITY "
    "AS wanted(id, n) ORDER BY n"
)
_UNLOCKS = text("SELECT pg_advisory_unlock(id) FROM unnest(CAST(:ids AS bigint[])) AS held(id)")
# Seconds a holder waits before trying again for a lock another session holds.
_RETRY_SECONDS = 0.01


class _AdvisoryLocks:
    """PostgreSQL session advisory locks, all on one connection of their own.

    One connection for every lock this process holds, outside the catalog's pool, rather than
    a connection per holder: a holder waits for its catalog commit, and holders each taking a
    pooled connection ran the pool dry under 16 concurrent uploads (none left to commit with).
    A pool of lock connections of their own would not deadlock, but would cost one PostgreSQL
    connection per concurrent upload and worker (its 16th holder waiting for the pool), where
    this costs one per process, whatever the concurrency. A session lock is re-entrant within
    its session, so holders of one key in this process queue here first.

    Every upload takes a lock and releases it: the locks and releases asked while a statement
    runs go together in the next one (releases first), so concurrent uploads share a worker
    thread hop and a round trip rather than taking two each (see _flush).
    """

    def __init__(self, engine: Engine) -> None:
        # Unpooled: the one connection is opened here on first use, closed when it broke.
        self._engine = create_engine(
            engine.url, poolclass=NullPool, connect_args=_connect_defaults(engine.url)
        )
        self._connection: Connection | None = None
        self._use = threading.Lock()  # one statement at a time on the connection
        self._local = KeyedLocks()
        self._locking: list[tuple[int, asyncio.Future[bool]]] = []
        self._unlocking: list[tuple[int, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def hold(self, lock_id: int) -> AsyncIterator[None]:
        async with self._local.hold(str(lock_id)):
            # Polled rather than a blocking call, so that waiters do not pin worker threads:
            # the lock lives in PostgreSQL, there is no local event to wait on.
            while not await self._ask(self._locking, lock_id):  # noqa: ASYNC110
                await asyncio.sleep(_RETRY_SECONDS)
            try:
                yield
            finally:
                await asyncio.shield(self._ask(self._unlocking, lock_id))

    def _ask(self, queue: list[tuple[int, asyncio.Future[_R]]], lock_id: int) -> asyncio.Future[_R]:
        """Queue a lock (or a release) for the next statement; its answer."""
        answer: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        queue.append((lock_id, answer))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return answer

    async def _flush(self) -> None:
        """Run the queued releases and locks, a statement each, until none is left; those
        asked while one runs go in the next. Nothing waits on purpose."""
        try:
            while self._locking or self._unlocking:
                locking, self._locking = self._locking, []
                unlocking, self._unlocking = self._unlocking, []
                try:
                    taken = await asyncio.to_thread(
                        self._run, [i for i, _ in unlocking], [i for i, _ in locking]
                    )
                except Exception as error:
                    for _, answer in locking:
                        if not answer.done():
                            answer.set_exception(_each_waiter(error))
                    taken = []
                for _, done in unlocking:
                    if not done.done():
                        done.set_result(None)
                for (lock_id, answer), got in zip(locking, taken, strict=False):
                    if not answer.done():
                        answer.set_result(got)
                    elif got:
                        # Its holder was cancelled meanwhile: nobody will release it.
                        released = asyncio.get_running_loop().create_future()
                        self._unlocking.append((lock_id, released))
        finally:
            self._flusher = None

    def _run(self, unlocks: list[int], locks: list[int]) -> list[bool]:
        with self._use:
            if unlocks:
                self._unlock(unlocks)
            return self._try_lock(locks) if locks else []

    def _try_lock(self, lock_ids: list[int]) -> list[bool]:
        while True:
            fresh = self._connection is None
            try:
                rows = self._session().execute(_TRY_LOCKS, {"ids": lock_ids})
                return [bool(row[0]) for row in rows]
            except DBAPIError:
                self._drop()
                # The pool's pre-ping, for the one connection kept out of the pool: one
                # that died while it sat there (the catalog restarted, a proxy cut it) is
                # replaced once; a new one failing means the catalog is away.
                if fresh:
                    raise

    def _unlock(self, lock_ids: list[int]) -> None:
        try:
            self._session().execute(_UNLOCKS, {"ids": lock_ids})
        except DBAPIError:
            # A broken connection took its session's locks with it: nothing to release.
            log.warning("could not release %d blob lock(s); reconnecting", len(lock_ids))
            self._drop()

    def _session(self) -> Connection:
        if self._connection is None:
            # Autocommit: the session holds locks, never an open transaction.
            self._connection = self._engine.connect().execution_options(
                isolation_level="AUTOCOMMIT"
            )
        return self._connection

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.invalidate()
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._use:
            self._drop()
        self._engine.dispose()
