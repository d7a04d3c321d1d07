"""The catalog's database: its engine and connections, SQLite's configuration and writer
lock, and running synchronous SQLAlchemy work in worker threads.

Every concern's SQL implementation (SqlItemCatalog, SqlTokenCatalog, ...) is a
SqlDatabase; SqlCatalog is all of them on one engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import URL, Engine, create_engine, event, make_url, text

from metalake.server.schema_versions import check_schema, engine_url
from metalake.server.sqlitelocks import WriterLock

_T = TypeVar("_T")


class SqlDatabase:
    """A catalog database on a SQLAlchemy engine: what every part of the catalog runs on."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # SQLite allows one writer; serialising writes here avoids its lock-upgrade deadlocks.
        # Across processes too: a server's worker processes share one SQLite file (see
        # sqlitelocks).
        self._write_lock: WriterLock | None = None
        if engine.dialect.name == "sqlite":
            self._write_lock = WriterLock(_sqlite_file(engine))

    @classmethod
    def open(cls, url: str, *, migrate: bool = False) -> Self:
        """Connect to the catalog at `url`, refusing a schema this server does not expect.

        With `migrate`, an older or empty schema is first brought up to date.
        """
        url = engine_url(url)
        # A pre-ping per checkout guards against dropped server connections (the pool recovers
        # by itself once the database is back); a SQLite file has none to drop, and the ping
        # would cost a round trip per query.
        server = not url.startswith("sqlite")
        engine = create_engine(
            url, pool_pre_ping=server, connect_args=_connect_defaults(url) if server else {}
        )
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _configure_sqlite)
        try:
            check_schema(engine, migrate=migrate)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)

    async def ping(self) -> None:
        """Raise unless the catalog answers a trivial query now (the health probe)."""
        await asyncio.to_thread(self._scalar, text("SELECT 1"))

    async def run(self, work: Callable[[], _T], *, write: bool = False) -> _T:
        """Run synchronous catalog work in a worker thread; `write` work takes SQLite's writer
        lock. For modules that keep tables of their own in this catalog (datasets, ...)."""
        return await self._run(work, write=write)

    async def _run(self, work: Callable[[], _T], *, write: bool = False) -> _T:
        return await asyncio.to_thread(self._under_write_lock(work) if write else work)

    def _under_write_lock(self, work: Callable[[], _T]) -> Callable[[], _T]:
        """`work`, made to hold SQLite's writer lock while it runs (elsewhere, `work` itself)."""
        lock = self._write_lock
        if lock is None:
            return work

        def locked() -> _T:
            with lock:
                return work()

        return locked

    def _scalar(self, statement: Any) -> Any:
        with self._engine.connect() as connection:
            return connection.execute(statement).scalar()

    def _execute(self, statement: Any) -> None:
        with self._engine.begin() as connection:
            connection.execute(statement)


def _sqlite_file(engine: Engine) -> Path | None:
    """The file of a SQLite catalog; None for any other (a PostgreSQL URL names a database too)."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


# libpq's defaults wait forever for a connection and never notice a peer that vanished: bound
# the first, and probe idle connections (TCP keepalives) so a dead one fails within a minute.
# Settings in the catalog URL's query win.
_SERVER_CONNECT_DEFAULTS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


def _connect_defaults(url: str | URL) -> dict[str, Any]:
    given = make_url(url).query
    return {k: v for k, v in _SERVER_CONNECT_DEFAULTS.items() if k not in given}


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL makes each commit durable,
    # which an acknowledged upload promises.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    # Filters' wildcards match case-sensitively, as PostgreSQL's LIKE does.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()
