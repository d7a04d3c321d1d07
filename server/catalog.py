"""The catalog: one row per data item, its metadata in typed, indexed columns.

`SqlCatalog` runs on any engine SQLAlchemy speaks; SQLite is the embedded default. Calls are
synchronous SQLAlchemy Core run in worker threads, so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    URL,
    BigInteger,
    Column,
    Connection,
    Engine,
    RowMapping,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    make_url,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import AsBoolean, BooleanClauseList, ColumnElement, TextClause

from metalake.labels import MAX_LABELS
from metalake.metadata import FIELDS, FLOAT_FIELDS, MetadataDict
from metalake.server.errors import (
    EtagMismatch,
    LimitReached,
    NotFound,
    invalid_field,
)
from metalake.server.faults import backend_fault
from metalake.server.filtering import EVENTS, FilterError, LabelMatch, compile_filter
from metalake.server.locks import KeyedLocks
from metalake.server.paging import ListQuery
from metalake.server.schema import (
    data_labels_table,
    data_table,
    data_tags_table,
    dataset_items_table,
    event_labels_table,
    event_log_table,
    event_tags_table,
    events_table,
    organizations_table,
    thumbnails_table,
    tokens_table,
    uploads_table,
)
from metalake.server.schema_versions import check_schema, engine_url
from metalake.server.sqlitelocks import BlobLocks, WriterLock

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1)
_ONE_MICROSECOND = timedelta(microseconds=1)
_T = TypeVar("_T")


@dataclass(frozen=True)
class DataRecord:
    """A stored item as the catalog knows it."""

    id: str
    org: str
    filename: str
    size: int
    sha256: str
    content_type: str
    blob_key: str
    created_at: datetime
    updated_at: datetime
    metadata: MetadataDict = field(default_factory=dict)
    metadata_sources: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    revision: int = 1
    request_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def etag(self) -> str:
        """Opaque to clients (AIP-154); changes with every change of the item."""
        return f'"{self.revision}"'


@dataclass(frozen=True)
class LabelChange:
    """What an update does to an item's labels: with `replace`, the labels become `set`;
    otherwise the keys in `set` are set and those in `remove` removed, the others kept."""

    set: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()
    replace: bool = False


class DuplicateRequestError(Exception):
    """An item with this request id is already stored: `existing`."""

    def __init__(self, existing: DataRecord) -> None:
        self.existing = existing
        super().__init__(f"request id {existing.request_id!r} already stored as {existing.id}")


@dataclass(frozen=True)
class UploadRecord:
    """A resumable upload: its header (JSON, opaque here) and how many bytes are durable."""

    org: str
    id: str
    staging_key: str
    header: str
    committed_size: int
    created_at: datetime
    expires_at: datetime
    data_id: str = ""


@dataclass(frozen=True)
class TokenRecord:
    """An API token as stored: never the token itself, only its SHA-256."""

    id: str
    token_hash: str
    org: str
    role: str
    description: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Organization:
    """An organization's usage and its own limits (None: the server's defaults apply)."""

    org: str
    used_bytes: int = 0
    max_file_size: int | None = None
    storage_quota: int | None = None


class EventType(IntEnum):
    """As in the contract's EventType."""

    CREATED = 1
    UPDATED = 2
    DELETED = 3


@dataclass(frozen=True)
class Event:
    """One change of one item: the item after it (before it, for a deletion)."""

    seq: int
    type: EventType
    time: datetime
    record: DataRecord


@dataclass(frozen=True)
class ThumbnailRecord:
    """A preview of an item, or (blob_key None) the finding that its content has none."""

    data_id: str
    size: int
    org: str
    source_sha256: str
    blob_key: str | None
    bytes: int
    width: int
    height: int
    created_at: datetime


@dataclass(frozen=True)
class _PendingAdd:
    record: DataRecord
    upload: UploadRecord | None
    default_quota: int | None
    done: asyncio.Future[None]


@dataclass(frozen=True)
class Page:
    records: list[DataRecord]
    next_page_token: str


class Catalog(Protocol):
    """What the datalake needs from a catalog, whatever engine holds it."""

    async def add(
        self,
        record: DataRecord,
        *,
        upload: UploadRecord | None = None,
        default_quota: int | None = None,
    ) -> None: ...

    def add_coming(self) -> AbstractContextManager[None]: ...

    async def organization(self, org: str) -> Organization: ...

    async def set_organization_limits(
        self, org: str, *, max_file_size: int | None, storage_quota: int | None
    ) -> None: ...

    async def get(self, org: str, data_id: str) -> DataRecord: ...

    async def list_page(
        self, org: str, *, filter: str, order_by: str, page_size: int, page_token: str
    ) -> Page: ...

    async def find_request(self, org: str, request_id: str) -> DataRecord | None: ...

    async def update_metadata(
        self,
        org: str,
        data_id: str,
        values: MetadataDict,
        clear: Collection[str],
        updated_at: datetime,
        *,
        etag: str = "",
        labels: LabelChange | None = None,
    ) -> DataRecord: ...

    async def delete(self, org: str, data_id: str, *, etag: str = "") -> DataRecord: ...

    async def blob_in_use(self, blob_key: str) -> bool: ...

    async def start_upload(self, upload: UploadRecord) -> UploadRecord: ...

    async def get_upload(self, org: str, upload_id: str) -> UploadRecord | None: ...

    async def set_upload_committed(self, upload: UploadRecord, committed_size: int) -> None: ...

    async def expired_uploads(self, now: datetime) -> list[UploadRecord]: ...

    async def staging_keys_in_use(self, keys: Collection[str]) -> set[str]: ...

    async def delete_upload(self, upload: UploadRecord) -> None: ...

    async def add_token(self, token: TokenRecord) -> None: ...

    async def find_token(self, token_hash: str) -> TokenRecord | None: ...

    async def list_tokens(self) -> list[TokenRecord]: ...

    async def revoke_token(self, token_id: str, at: datetime) -> bool: ...

    async def has_active_tokens(self) -> bool: ...

    async def events_after(self, org: str, seq: int, *, filter: str, limit: int) -> list[Event]: ...

    async def last_event_seq(self) -> int: ...

    async def pruned_through(self) -> int: ...

    async def prune_events(self, before: datetime) -> int: ...

    def hold_blob(self, blob_key: str) -> AbstractAsyncContextManager[None]: ...

    async def close(self) -> None: ...

    async def thumbnail(self, org: str, data_id: str, size: int) -> ThumbnailRecord | None: ...

    async def shared_thumbnail(self, source_sha256: str, size: int) -> ThumbnailRecord | None: ...

    async def add_thumbnail(self, record: ThumbnailRecord) -> ThumbnailRecord: ...

    async def thumbnail_keys(self, org: str, data_id: str) -> list[str]: ...

    async def distinct_values(self, org: str, field: str, limit: int) -> list[str]: ...

    async def ping(self) -> None: ...

    async def imported_under(self, org: str, request_prefix: str) -> list[tuple[str, str]]: ...

    async def replace_content(self, org: str, record: DataRecord) -> DataRecord: ...


class SqlCatalog:
    """A catalog on a SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # SQLite allows one writer; serialising writes here avoids its lock-upgrade deadlocks.
        # Across processes too: a server's worker processes share one SQLite file, and on
        # it blob holds are file locks (see sqlitelocks).
        self._write_lock: WriterLock | None = None
        self._blob_file_locks: BlobLocks | None = None
        if engine.dialect.name == "sqlite":
            database = _sqlite_file(engine)
            self._write_lock = WriterLock(database)
            self._blob_file_locks = BlobLocks(database) if database else None
        # Concurrent adds share one transaction and one commit (see _flush_adds).
        self._pending_adds: list[_PendingAdd] = []
        # Adds on their way (see add_coming), and how long the last batch took to commit.
        self._adds_coming = 0
        self._add_arrived: asyncio.Future[None] | None = None
        self._commit_seconds = 0.0
        self._known_organizations: set[str] = set()
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        self._blob_locks = _AdvisoryLocks(engine) if engine.dialect.name == "postgresql" else None
        self._bulk_inserts: dict[Insert, _BulkInsert] = {}

    @classmethod
    def open(cls, url: str, *, migrate: bool = False) -> SqlCatalog:
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

    @asynccontextmanager
    async def hold_blob(self, blob_key: str) -> AsyncIterator[None]:
        """Exclusive use of a blob key across every server sharing this catalog: between
        deciding a blob is unused and deleting it, nobody may commit the same content.

        On PostgreSQL, a session advisory lock (see _AdvisoryLocks). On a SQLite file, a file
        lock (the processes sharing it are one server's workers; see sqlitelocks.BlobLocks).
        """
        if self._blob_locks is not None:
            async with self._blob_locks.hold(int(blob_key[:15], 16)):
                yield
        elif self._blob_file_locks is not None:
            async with self._blob_file_locks.hold(blob_key):
                yield
        else:
            yield

    async def close(self) -> None:
        if self._blob_locks is not None:
            await asyncio.to_thread(self._blob_locks.close)
        await asyncio.to_thread(self._engine.dispose)

    async def ping(self) -> None:
        """Raise unless the catalog answers a trivial query now (the health probe)."""
        await asyncio.to_thread(self._scalar, text("SELECT 1"))

    async def imported_under(self, org: str, request_prefix: str) -> list[tuple[str, str]]:
        """(id, request_id) of the items whose request id starts with `request_prefix`."""
        column = data_table.c.request_id
        pattern = request_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        statement = select(data_table.c.id, column).where(
            data_table.c.org == org, column.like(pattern + "%", escape="\\")
        )

        def work() -> list[tuple[str, str]]:
            with self._engine.connect() as connection:
                return [(row[0], row[1]) for row in connection.execute(statement)]

        return await self._run(work)

    async def replace_content(self, org: str, record: DataRecord) -> DataRecord:
        """Point an item at other content (a referenced object that changed): its size, sha256,
        blob key, content type, metadata and sources become `record`'s; an UPDATED event."""

        def work() -> DataRecord:
            with self._engine.begin() as connection:
                row = (
                    connection.execute(
                        select(data_table).where(_item(org, record.id)).with_for_update()
                    )
                    .mappings()
                    .first()
                )
                if row is None:
                    raise NotFound(record.id)
                changes = {
                    k: v
                    for k, v in _record_to_row(record).items()
                    if k not in ("id", "org", "created_at", "revision", "request_id")
                }
                for name in FIELDS:
                    changes.update(_metadata_columns(name, record.metadata.get(name)))
                changes["revision"] = row["revision"] + 1
                connection.execute(
                    update(data_table).where(data_table.c.id == record.id).values(changes)
                )
                new_row = (
                    connection.execute(select(data_table).where(data_table.c.id == record.id))
                    .mappings()
                    .one()
                )
                updated = self._records(connection, [new_row])[0]
                self._record_event(connection, EventType.UPDATED, updated, record.updated_at)
                return updated

        return await self._run(work, write=True)

    async def add(
        self,
        record: DataRecord,
        *,
        upload: UploadRecord | None = None,
        default_quota: int | None = None,
    ) -> None:
        """Store an item, counting its bytes against its organization's storage quota (its own,
        else `default_quota`); with `upload`, also mark that resumable upload finished by it.

        Returns once the item is committed. Concurrent adds are committed together (one
        transaction, one fsync), each still accepted or refused on its own.
        """
        pending = _PendingAdd(
            record, upload, default_quota, asyncio.get_running_loop().create_future()
        )
        self._pending_adds.append(pending)
        self._wake_flusher()
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.create_task(self._flush_adds())
        await pending.done

    @contextmanager
    def add_coming(self) -> Iterator[None]:
        """While this is held, an add is on its way (its upload is storing the blob): a batch
        about to commit waits a little for it (see _gather_adds)."""
        self._adds_coming += 1
        try:
            yield
        finally:
            self._adds_coming -= 1
            self._wake_flusher()  # if it never comes (the blob failed), stop waiting for it

    def _wake_flusher(self) -> None:
        if self._add_arrived is not None and not self._add_arrived.done():
            self._add_arrived.set_result(None)

    async def _gather_adds(self) -> None:
        """Before a batch commits, wait for the adds on their way, for as long as the last
        commit took (at most _MAX_LINGER).

        A commit costs about the same CPU (and an fsync) whatever its size, and concurrent
        uploads finish their blobs a few milliseconds apart: without waiting, 16 concurrent
        uploads committed 1.5 items per batch. Waiting at most one commit's time costs an add
        at most that much latency, and those that arrive meanwhile would otherwise have waited
        for this commit to end before starting theirs. An add with none on its way does not
        wait.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self._commit_seconds, _MAX_LINGER)
        while self._adds_coming and len(self._pending_adds) < _MAX_BATCH:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._add_arrived = arrived = loop.create_future()
            try:
                await asyncio.wait((arrived,), timeout=left)
            finally:
                self._add_arrived = None

    async def _flush_adds(self) -> None:
        """Commit queued adds in batches: while one batch commits, the next one gathers."""
        try:
            while self._pending_adds:
                await self._gather_adds()
                batch = self._pending_adds[:_MAX_BATCH]
                self._pending_adds = self._pending_adds[_MAX_BATCH:]
                started = time.monotonic()
                try:
                    outcomes = await self._run(
                        functools.partial(self._add_batch, batch), write=True
                    )
                except Exception as error:
                    # Every add of the batch fails with it: each as the backend fault it is
                    # (UNAVAILABLE, RESOURCE_EXHAUSTED), each its own exception object, since
                    # one object raised in many tasks would pile their tracebacks up.
                    outcomes = [_each_waiter(error) for _ in batch]
                self._commit_seconds = time.monotonic() - started
                for item, outcome in zip(batch, outcomes, strict=True):
                    if item.done.done():
                        continue  # its upload was cancelled meanwhile
                    if outcome is None:
                        item.done.set_result(None)
                    else:
                        item.done.set_exception(outcome)
        finally:
            self._flushing = False

    async def organization(self, org: str) -> Organization:
        statement = select(organizations_table).where(organizations_table.c.org == org)

        def work() -> Organization:
            with self._engine.connect() as connection:
                row = connection.execute(statement).mappings().first()
            return Organization(**row) if row is not None else Organization(org)

        return await self._run(work)

    async def set_organization_limits(
        self, org: str, *, max_file_size: int | None, storage_quota: int | None
    ) -> None:
        def work() -> None:
            with self._engine.begin() as connection:
                self._ensure_organization(connection, org)
                connection.execute(
                    update(organizations_table)
                    .where(organizations_table.c.org == org)
                    .values(max_file_size=max_file_size, storage_quota=storage_quota)
                )

        await self._run(work, write=True)

    def _ensure_organization(self, connection: Connection, org: str) -> None:
        # Organizations are never deleted: once a committed transaction created the row, it
        # exists for good (callers record that after commit), and this insert can be skipped.
        if org in self._known_organizations:
            return
        dialect_insert = (
            postgresql_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        )
        connection.execute(
            dialect_insert(organizations_table)
            .values(org=org, used_bytes=0)
            .on_conflict_do_nothing(index_elements=["org"])
        )

    async def get(self, org: str, data_id: str) -> DataRecord:
        return await self._run(lambda: self._get(org, data_id))

    async def list_page(
        self, org: str, *, filter: str, order_by: str, page_size: int, page_token: str
    ) -> Page:
        query = ListQuery.parse(filter, order_by, page_size, page_token)
        return await self._run(lambda: self._list(org, query))

    async def find_request(self, org: str, request_id: str) -> DataRecord | None:
        return await self._run(lambda: self._find_request(org, request_id))

    async def update_metadata(
        self,
        org: str,
        data_id: str,
        values: MetadataDict,
        clear: Collection[str],
        updated_at: datetime,
        *,
        etag: str = "",
        labels: LabelChange | None = None,
    ) -> DataRecord:
        return await self._run(
            lambda: self._update_metadata(org, data_id, values, clear, updated_at, etag, labels),
            write=True,
        )

    async def delete(self, org: str, data_id: str, *, etag: str = "") -> DataRecord:
        return await self._run(lambda: self._delete(org, data_id, etag), write=True)

    async def blob_in_use(self, blob_key: str) -> bool:
        """Whether an item, an item frozen in a dataset version, or a preview is this blob."""
        statements = [
            select(table.c.id).where(table.c.blob_key == blob_key).limit(1)
            for table in (data_table, dataset_items_table)
        ]
        statements.append(
            select(thumbnails_table.c.data_id)
            .where(thumbnails_table.c.blob_key == blob_key)
            .limit(1)
        )
        return await self._run(
            lambda: any(self._scalar(statement) is not None for statement in statements)
        )

    # Previews (server/thumbnails.py).

    async def thumbnail(self, org: str, data_id: str, size: int) -> ThumbnailRecord | None:
        t = thumbnails_table.c
        statement = select(thumbnails_table).where(
            t.data_id == data_id, t.org == org, t.size == size
        )
        return await self._run(lambda: self._thumbnail(statement))

    async def shared_thumbnail(self, source_sha256: str, size: int) -> ThumbnailRecord | None:
        """A preview made for another item with the same content, if any."""
        t = thumbnails_table.c
        statement = (
            select(thumbnails_table)
            .where(t.source_sha256 == source_sha256, t.size == size)
            .limit(1)
        )
        return await self._run(lambda: self._thumbnail(statement))

    def _thumbnail(self, statement: Any) -> ThumbnailRecord | None:
        with self._engine.connect() as connection:
            row = connection.execute(statement).mappings().first()
        return _thumbnail_from_row(row) if row is not None else None

    async def add_thumbnail(self, record: ThumbnailRecord) -> ThumbnailRecord:
        """Record a preview and count its bytes in the organization's usage; the one recorded
        first wins. NotFound when the item is gone (deleted meanwhile)."""

        def work() -> ThumbnailRecord:
            t = thumbnails_table.c
            with self._engine.begin() as connection:
                item = connection.execute(
                    select(data_table.c.id).where(_item(record.org, record.data_id))
                ).first()
                if item is None:
                    raise NotFound(record.data_id)
                dialect_insert = (
                    postgresql_insert
                    if self._engine.dialect.name == "postgresql"
                    else sqlite_insert
                )
                row = {**record.__dict__, "created_at": _to_micros(record.created_at)}
                # RETURNING, not rowcount: a driver may report -1 for an insert.
                inserted = (
                    connection.execute(
                        dialect_insert(thumbnails_table)
                        .values(row)
                        .on_conflict_do_nothing()
                        .returning(thumbnails_table.c.data_id)
                    ).first()
                    is not None
                )
                if inserted and record.bytes:
                    self._ensure_organization(connection, record.org)
                    connection.execute(
                        update(organizations_table)
                        .where(organizations_table.c.org == record.org)
                        .values(used_bytes=organizations_table.c.used_bytes + record.bytes)
                    )
                stored = (
                    connection.execute(
                        select(thumbnails_table).where(
                            t.data_id == record.data_id, t.size == record.size
                        )
                    )
                    .mappings()
                    .one()
                )
            return _thumbnail_from_row(stored)

        return await self._run(work, write=True)

    async def distinct_values(self, org: str, field: str, limit: int) -> list[str]:
        """The first `limit` distinct values of an indexed text field, in order.

        A loose index scan (one index seek per value, a recursive query both engines run), so
        that it costs the number of values, not the number of items.
        """
        if field == "tags":
            statement = _DISTINCT_TAGS
            params: dict[str, object] = {"org": org, "limit": limit}
        elif field == "labels":
            statement = _DISTINCT_LABEL_KEYS
            params = {"org": org, "limit": limit}
        elif field.startswith("labels."):
            statement = _DISTINCT_LABEL_VALUES
            params = {"org": org, "key": field.removeprefix("labels."), "limit": limit}
        elif field in FACET_FIELDS:
            statement = _distinct_field(field)
            params = {"org": org, "limit": limit}
        else:
            raise ValueError(f"{field} has no index to read distinct values from")

        def work() -> list[str]:
            with self._engine.connect() as connection:
                rows = connection.execute(statement, params)
                return [value for (value,) in rows]

        return await self._run(work)

    async def thumbnail_keys(self, org: str, data_id: str) -> list[str]:
        t = thumbnails_table.c
        statement = select(t.blob_key).where(
            t.data_id == data_id, t.org == org, t.blob_key.is_not(None)
        )

        def work() -> list[str]:
            with self._engine.connect() as connection:
                return [key for (key,) in connection.execute(statement)]

        return await self._run(work)

    async def start_upload(self, upload: UploadRecord) -> UploadRecord:
        """Record a new upload, or return the one that already has this id."""
        return await self._run(lambda: self._start_upload(upload), write=True)

    async def get_upload(self, org: str, upload_id: str) -> UploadRecord | None:
        return await self._run(lambda: self._get_upload(org, upload_id))

    async def set_upload_committed(self, upload: UploadRecord, committed_size: int) -> None:
        statement = (
            update(uploads_table)
            .where(uploads_table.c.staging_key == upload.staging_key)
            .values(committed_size=committed_size)
        )
        await self._run(lambda: self._execute(statement), write=True)

    async def expired_uploads(self, now: datetime) -> list[UploadRecord]:
        statement = select(uploads_table).where(uploads_table.c.expires_at < _to_micros(now))

        def work() -> list[UploadRecord]:
            with self._engine.connect() as connection:
                return [_upload_from_row(row) for row in connection.execute(statement).mappings()]

        return await self._run(work)

    async def staging_keys_in_use(self, keys: Collection[str]) -> set[str]:
        statement = select(uploads_table.c.staging_key).where(
            uploads_table.c.staging_key.in_(list(keys))
        )

        def work() -> set[str]:
            with self._engine.connect() as connection:
                return set(connection.execute(statement).scalars())

        return await self._run(work) if keys else set()

    async def delete_upload(self, upload: UploadRecord) -> None:
        statement = delete(uploads_table).where(uploads_table.c.staging_key == upload.staging_key)
        await self._run(lambda: self._execute(statement), write=True)

    async def add_token(self, token: TokenRecord) -> None:
        values = {
            "id": token.id,
            "token_hash": token.token_hash,
            "org": token.org,
            "role": token.role,
            "description": token.description,
            "created_at": _to_micros(token.created_at),
            "revoked_at": None,
        }
        await self._run(lambda: self._execute(insert(tokens_table).values(values)), write=True)

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        tokens = await self._tokens(tokens_table.c.token_hash == token_hash)
        return tokens[0] if tokens else None

    async def list_tokens(self) -> list[TokenRecord]:
        return await self._tokens(None)

    async def revoke_token(self, token_id: str, at: datetime) -> bool:
        statement = (
            update(tokens_table)
            .where(tokens_table.c.id == token_id, tokens_table.c.revoked_at.is_(None))
            .values(revoked_at=_to_micros(at))
        )

        def work() -> bool:
            with self._engine.begin() as connection:
                return connection.execute(statement).rowcount > 0

        return await self._run(work, write=True)

    async def has_active_tokens(self) -> bool:
        statement = select(tokens_table.c.id).where(tokens_table.c.revoked_at.is_(None)).limit(1)
        return await self._run(lambda: self._scalar(statement) is not None)

    async def _tokens(self, condition: ColumnElement[bool] | None) -> list[TokenRecord]:
        statement = select(tokens_table).order_by(tokens_table.c.created_at)
        if condition is not None:
            statement = statement.where(condition)

        def work() -> list[TokenRecord]:
            with self._engine.connect() as connection:
                return [
                    TokenRecord(
                        id=row["id"],
                        token_hash=row["token_hash"],
                        org=row["org"],
                        role=row["role"],
                        description=row["description"],
                        created_at=_from_micros(row["created_at"]),
                        revoked_at=(
                            _from_micros(row["revoked_at"])
                            if row["revoked_at"] is not None
                            else None
                        ),
                    )
                    for row in connection.execute(statement).mappings()
                ]

        return await self._run(work)

    # Synchronous halves, run in worker threads.

    def _execute(self, statement: Any) -> None:
        with self._engine.begin() as connection:
            connection.execute(statement)

    def _start_upload(self, upload: UploadRecord) -> UploadRecord:
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    insert(uploads_table).values(
                        org=upload.org,
                        id=upload.id,
                        staging_key=upload.staging_key,
                        header=upload.header,
                        committed_size=upload.committed_size,
                        created_at=_to_micros(upload.created_at),
                        expires_at=_to_micros(upload.expires_at),
                        data_id=upload.data_id or None,
                    )
                )
            return upload
        except IntegrityError:
            existing = self._get_upload(upload.org, upload.id)
            if existing is None:
                raise
            return existing

    def _get_upload(self, org: str, upload_id: str) -> UploadRecord | None:
        statement = select(uploads_table).where(
            uploads_table.c.org == org, uploads_table.c.id == upload_id
        )
        with self._engine.connect() as connection:
            row = connection.execute(statement).mappings().first()
        return _upload_from_row(row) if row is not None else None

    async def run(self, work: Callable[[], _T], *, write: bool = False) -> _T:
        """Run synchronous catalog work in a worker thread; `write` work takes SQLite's writer
        lock. For modules that keep tables of their own in this catalog (datasets, ...)."""
        return await self._run(work, write=write)

    async def _run(self, work: Callable[[], _T], *, write: bool = False) -> _T:
        if write and self._write_lock is not None:
            lock = self._write_lock

            def locked() -> _T:
                with lock:
                    return work()

            return await asyncio.to_thread(locked)
        return await asyncio.to_thread(work)

    def _scalar(self, statement: Any) -> Any:
        with self._engine.connect() as connection:
            return connection.execute(statement).scalar()

    def _add_batch(self, items: list[_PendingAdd]) -> list[Exception | None]:
        """Many items in one transaction, so one commit (one fsync) covers them all.

        An item refused for its request id or its quota changes nothing, so the others commit.
        If the database rejects the batch (a constraint one item violates, or a request id
        another server stored meanwhile), each item is tried again in a transaction of its
        own: only the item at fault fails.
        """
        try:
            with self._engine.begin() as connection:
                outcomes = self._insert_batch(connection, items)
        except (IntegrityError, DataError):
            return [self._add_alone(item) for item in items]
        self._known_organizations.update(item.record.org for item in items)
        return outcomes

    def _add_alone(self, item: _PendingAdd) -> Exception | None:
        record = item.record
        try:
            with self._engine.begin() as connection:
                [outcome] = self._insert_batch(connection, [item])
        except IntegrityError as error:
            # The unique request id is the arbiter between concurrent retries of one upload.
            existing = (
                self._find_request(record.org, record.request_id) if record.request_id else None
            )
            return DuplicateRequestError(existing) if existing is not None else error
        except DataError as error:
            return error
        self._known_organizations.add(record.org)
        return outcome

    def _insert_batch(
        self, connection: Connection, items: Sequence[_PendingAdd]
    ) -> list[Exception | None]:
        """Insert items in the caller's transaction with a few statements, whatever their
        number; for each, None or the Exception (changing nothing) that refuses it.

        Only one writer runs at a time on SQLite, in every worker process of the server (the
        WriterLock is an flock), so checking request ids before inserting is race-free there;
        on PostgreSQL the unique index catches a race (see _add_batch). A second item with the
        request id of a first one in the same batch is its retry: it gets the first one's
        answer.
        """
        outcomes: list[Exception | None] = [None] * len(items)
        stored = self._stored_requests(connection, items)
        first_tries: dict[tuple[str, str], int] = {}
        retries: list[tuple[int, int]] = []
        candidates: defaultdict[tuple[str, int | None], list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            record = item.record
            if record.request_id:
                key = (record.org, record.request_id)
                if key in stored:
                    outcomes[index] = DuplicateRequestError(stored[key])
                    continue
                if key in first_tries:
                    retries.append((index, first_tries[key]))
                    continue
                first_tries[key] = index
            candidates[(record.org, item.default_quota)].append(index)
        for (org, default_quota), indexes in candidates.items():
            self._ensure_organization(connection, org)
            self._count_bytes(connection, org, default_quota, items, indexes, outcomes)
        for index, first in retries:
            outcomes[index] = outcomes[first] or DuplicateRequestError(items[first].record)
        accepted = [item for item, outcome in zip(items, outcomes, strict=True) if outcome is None]
        if accepted:
            self._insert_records(connection, accepted)
        return outcomes

    def _bulk(self, statement: Insert) -> _BulkInsert:
        bulk = self._bulk_inserts.get(statement)
        if bulk is None:
            bulk = self._bulk_inserts[statement] = _BulkInsert(statement, self._engine.dialect)
        return bulk

    def _stored_requests(
        self, connection: Connection, items: Sequence[_PendingAdd]
    ) -> dict[tuple[str, str], DataRecord]:
        """The items already stored under the request ids of `items`: one query per org."""
        wanted: defaultdict[str, set[str]] = defaultdict(set)
        for item in items:
            if item.record.request_id:
                wanted[item.record.org].add(item.record.request_id)
        stored = {}
        for org, request_ids in wanted.items():
            rows = list(
                connection.execute(
                    _FIND_REQUESTS, {"org": org, "request_ids": sorted(request_ids)}
                ).mappings()
            )
            for found in self._records(connection, rows):
                stored[(found.org, found.request_id)] = found
        return stored

    def _count_bytes(
        self,
        connection: Connection,
        org: str,
        default_quota: int | None,
        items: Sequence[_PendingAdd],
        indexes: list[int],
        outcomes: list[Exception | None],
    ) -> None:
        """Count the items' bytes against the organization's quota, refusing those that do
        not fit. One conditional UPDATE for all of them: concurrent uploads (even through
        other servers) cannot overshoot the quota together. When they do not all fit, each is
        counted in turn, in order, as if it had come alone."""

        def count(size: int) -> bool:
            parameters = {"b_org": org, "b_quota": default_quota, "b_size": size}
            return bool(connection.execute(_COUNT_BYTES, parameters).rowcount == 1)

        if count(sum(items[i].record.size for i in indexes)):
            return
        for index in indexes:
            record = items[index].record
            if len(indexes) == 1 or not count(record.size):
                outcomes[index] = LimitReached(
                    f"storing {record.size} bytes would exceed the storage quota of "
                    f"organization {record.org!r}"
                )

    def _insert_records(self, connection: Connection, items: Sequence[_PendingAdd]) -> None:
        """The rows of accepted items: data, tags, labels, finished uploads and the change log
        (with the events' tags and labels), each table in one executemany."""
        records = [item.record for item in items]
        # executemany needs every row to name the same columns.
        rows = [_DATA_ROW | _record_to_row(record) for record in records]
        self._bulk(_INSERT_DATA).run(connection, rows)
        tags = [{"data_id": r.id, "tag": tag, "org": r.org} for r in records for tag in r.tags]
        if tags:
            self._bulk(_INSERT_TAGS).run(connection, tags)
        labels = [
            {
                "data_id": r.id,
                "key": key,
                "value": value,
                "org": r.org,
                "created_at": _to_micros(r.created_at),
            }
            for r in records
            for key, value in r.labels.items()
        ]
        if labels:
            self._bulk(_INSERT_LABELS).run(connection, labels)
        uploads = [
            {"b_staging_key": item.upload.staging_key, "b_data_id": item.record.id}
            for item in items
            if item.upload is not None
        ]
        if uploads:
            connection.execute(_FINISH_UPLOAD, uploads)
        self._lock_event_order(connection)
        for row in rows:
            row["event_type"] = int(EventType.CREATED)
            row["event_time"] = row["created_at"]
        if not tags and not labels:
            self._bulk(_INSERT_EVENTS).run(connection, rows)
            return
        seqs = connection.execute(_INSERT_EVENTS_RETURNING, rows).scalars().all()
        if tags:
            connection.execute(
                _INSERT_EVENT_TAGS,
                [
                    {"seq": seq, "tag": tag}
                    for seq, record in zip(seqs, records, strict=True)
                    for tag in record.tags
                ],
            )
        if labels:
            connection.execute(
                _INSERT_EVENT_LABELS,
                [
                    {"seq": seq, "key": key, "value": value}
                    for seq, record in zip(seqs, records, strict=True)
                    for key, value in record.labels.items()
                ],
            )

    def _find_request(self, org: str, request_id: str) -> DataRecord | None:
        statement = select(data_table).where(
            data_table.c.org == org, data_table.c.request_id == request_id
        )
        with self._engine.connect() as connection:
            row = connection.execute(statement).mappings().first()
            return self._records(connection, [row])[0] if row is not None else None

    def _get(self, org: str, data_id: str) -> DataRecord:
        with self._engine.connect() as connection:
            row = (
                connection.execute(select(data_table).where(_item(org, data_id))).mappings().first()
            )
            if row is None:
                raise NotFound(data_id)
            return self._records(connection, [row])[0]

    def _list(self, org: str, query: ListQuery) -> Page:
        driver = _driving_label(query)
        if driver is None and query.where is not None and self._engine.dialect.name == "sqlite":
            self._choose_label_plans(query.where)
        if driver is not None:
            statement = _pages_by_label(org, query, driver)
        else:
            conditions = [data_table.c.org == org]
            conditions += [c for c in (query.where, query.after()) if c is not None]
            statement = select(data_table).where(and_(*conditions))
            statement = statement.order_by(*query.order_clauses()).limit(query.page_size + 1)
        with self._engine.connect() as connection:
            rows = list(connection.execute(statement).mappings())
            more = len(rows) > query.page_size
            rows = rows[: query.page_size]
            records = self._records(connection, rows)
        token = query.token_after(rows[-1]) if more else ""
        return Page(records, token)

    def _choose_label_plans(self, where: ColumnElement[bool]) -> None:
        """SQLite: read few matching labels from their index, walk the page order for many.

        Up to _FEW_LABELS matches, reading and sorting them costs less than walking the items
        in order until a page is found; beyond, the walk finds a page sooner.
        """
        matches = [e for e in visitors.iterate(where) if isinstance(e, LabelMatch)]
        if not matches:
            return
        with self._engine.connect() as connection:
            for match in matches:
                selected = [data_labels_table.c.key == match.key]
                if match.value is not None:
                    selected.append(data_labels_table.c.value == match.value)
                found = select(data_labels_table.c.data_id).where(*selected).limit(_FEW_LABELS)
                count = connection.execute(
                    select(func.count()).select_from(found.subquery())
                ).scalar_one()
                match.drive_from_labels = count < _FEW_LABELS

    def _update_metadata(
        self,
        org: str,
        data_id: str,
        values: MetadataDict,
        clear: Collection[str],
        updated_at: datetime,
        etag: str,
        labels: LabelChange | None = None,
    ) -> DataRecord:
        with self._engine.begin() as connection:
            row = (
                connection.execute(select(data_table).where(_item(org, data_id)).with_for_update())
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(data_id)
            _check_etag(row, etag)
            sources = json.loads(row["metadata_sources"])
            changes: dict[str, Any] = {}
            for name in clear:
                changes.update(_metadata_columns(name, None))
                sources.pop(name, None)
            for name, value in values.items():
                changes.update(_metadata_columns(name, value))
                sources[name] = "client"
            changes["metadata_sources"] = json.dumps(sources, sort_keys=True)
            changes["updated_at"] = _to_micros(updated_at)
            changes["revision"] = row["revision"] + 1
            if labels is not None:
                _change_labels(connection, row, labels)
            connection.execute(update(data_table).where(data_table.c.id == data_id).values(changes))
            new_row = (
                connection.execute(select(data_table).where(data_table.c.id == data_id))
                .mappings()
                .one()
            )
            updated = self._records(connection, [new_row])[0]
            self._record_event(connection, EventType.UPDATED, updated, updated_at)
            return updated

    def _delete(self, org: str, data_id: str, etag: str) -> DataRecord:
        with self._engine.begin() as connection:
            row = (
                connection.execute(select(data_table).where(_item(org, data_id)).with_for_update())
                .mappings()
                .first()
            )
            if row is None:
                raise NotFound(data_id)
            _check_etag(row, etag)
            record = self._records(connection, [row])[0]
            # Its previews go with it, and their bytes with its own.
            previews = connection.execute(
                select(func.coalesce(func.sum(thumbnails_table.c.bytes), 0)).where(
                    thumbnails_table.c.data_id == data_id
                )
            ).scalar_one()
            connection.execute(
                delete(thumbnails_table).where(thumbnails_table.c.data_id == data_id)
            )
            connection.execute(
                update(organizations_table)
                .where(organizations_table.c.org == org)
                .values(used_bytes=organizations_table.c.used_bytes - record.size - previews)
            )
            connection.execute(delete(data_tags_table).where(data_tags_table.c.data_id == data_id))
            connection.execute(
                delete(data_labels_table).where(data_labels_table.c.data_id == data_id)
            )
            connection.execute(delete(data_table).where(data_table.c.id == data_id))
            self._record_event(connection, EventType.DELETED, record, datetime.now(UTC))
            return record

    def _record_event(
        self, connection: Connection, event_type: EventType, record: DataRecord, at: datetime
    ) -> None:
        self._lock_event_order(connection)
        row = _record_to_row(record) | {
            "event_type": int(event_type),
            "event_time": _to_micros(at),
        }
        seq = connection.execute(
            insert(events_table).values(row).returning(events_table.c.seq)
        ).scalar_one()
        if record.tags:
            connection.execute(
                insert(event_tags_table), [{"seq": seq, "tag": tag} for tag in record.tags]
            )
        _insert_labels(connection, event_labels_table, {"seq": seq}, record.labels)

    def _lock_event_order(self, connection: Connection) -> None:
        if self._engine.dialect.name == "postgresql":
            # Sequence numbers are handed out at insert but become visible at commit; holding
            # this lock to the commit makes them visible in order, so a watcher that read up
            # to seq N never later finds a smaller one. SQLite serialises writes anyway.
            connection.execute(_LOCK_EVENT_ORDER, {"key": _EVENTS_LOCK})

    async def events_after(self, org: str, seq: int, *, filter: str, limit: int) -> list[Event]:
        """The organization's events after `seq` that match `filter`, oldest first."""
        try:
            condition = compile_filter(filter, EVENTS)
        except FilterError as error:
            raise invalid_field("filter", str(error)) from None
        conditions = [events_table.c.org == org, events_table.c.seq > seq]
        if condition is not None:
            conditions.append(condition)
        statement = (
            select(events_table).where(*conditions).order_by(events_table.c.seq).limit(limit)
        )

        def work() -> list[Event]:
            with self._engine.connect() as connection:
                rows = list(connection.execute(statement).mappings())
                tags: dict[int, list[str]] = {row["seq"]: [] for row in rows}
                if rows:
                    for event_seq, tag in connection.execute(
                        select(event_tags_table.c.seq, event_tags_table.c.tag)
                        .where(event_tags_table.c.seq.in_(list(tags)))
                        .order_by(event_tags_table.c.seq, event_tags_table.c.tag)
                    ):
                        tags[event_seq].append(tag)
                labels = _labels_of(connection, event_labels_table.c.seq, list(tags))
            return [
                Event(
                    seq=row["seq"],
                    type=EventType(row["event_type"]),
                    time=_from_micros(row["event_time"]),
                    record=_row_to_record(row, tuple(tags[row["seq"]]), labels.get(row["seq"])),
                )
                for row in rows
            ]

        return await self._run(work)

    async def last_event_seq(self) -> int:
        statement = select(func.max(events_table.c.seq))
        return int(await self._run(lambda: self._scalar(statement)) or 0)

    async def pruned_through(self) -> int:
        statement = select(event_log_table.c.pruned_through).where(event_log_table.c.id == 1)
        return int(await self._run(lambda: self._scalar(statement)) or 0)

    async def prune_events(self, before: datetime) -> int:
        """Forget events older than `before`; watchers resuming from them will be told."""

        def work() -> int:
            with self._engine.begin() as connection:
                last = connection.execute(
                    select(func.max(events_table.c.seq)).where(
                        events_table.c.event_time < _to_micros(before)
                    )
                ).scalar()
                if last is None:
                    return 0
                connection.execute(delete(event_tags_table).where(event_tags_table.c.seq <= last))
                connection.execute(
                    delete(event_labels_table).where(event_labels_table.c.seq <= last)
                )
                pruned = connection.execute(
                    delete(events_table).where(events_table.c.seq <= last)
                ).rowcount
                # Pruning goes oldest first, so `last` only ever grows.
                updated = connection.execute(
                    update(event_log_table)
                    .where(event_log_table.c.id == 1)
                    .values(pruned_through=last)
                ).rowcount
                if not updated:
                    connection.execute(insert(event_log_table).values(id=1, pruned_through=last))
                return int(pruned)

        return await self._run(work, write=True)

    def _records(self, connection: Connection, rows: Sequence[RowMapping]) -> list[DataRecord]:
        tags: dict[str, list[str]] = {row["id"]: [] for row in rows}
        if rows:
            tag_rows = connection.execute(
                select(data_tags_table.c.data_id, data_tags_table.c.tag)
                .where(data_tags_table.c.data_id.in_(list(tags)))
                .order_by(data_tags_table.c.data_id, data_tags_table.c.tag)
            )
            for data_id, tag in tag_rows:
                tags[data_id].append(tag)
        labels = _labels_of(connection, data_labels_table.c.data_id, list(tags)) if rows else {}
        return [_row_to_record(row, tuple(tags[row["id"]]), labels.get(row["id"])) for row in rows]


def _distinct_field(field: str) -> TextClause:
    """The loose index scan over (org, field): one index seek per distinct value."""
    # `field` is one of FACET_FIELDS (checked by the caller), never user text.
    return text(
        f"""
        WITH RECURSIVE found(value, n) AS (
            SELECT (SELECT MIN({field}) FROM data WHERE org = :org), 1
            UNION ALL
            SELECT (SELECT MIN({field}) FROM data WHERE org = :org AND {field} > found.value),
                   n + 1
            FROM found WHERE found.value IS NOT NULL AND n < :limit
        )
        SELECT value FROM found WHERE value IS NOT NULL
        """
    )


# Labels: the index (org, key, ...) gives the keys, (org, key, value, ...) the values of one key,
# each by one seek per distinct key or value.
_DISTINCT_LABEL_KEYS = text(
    """
    WITH RECURSIVE found(value, n) AS (
        SELECT (SELECT MIN(key) FROM data_labels WHERE org = :org), 1
        UNION ALL
        SELECT (SELECT MIN(key) FROM data_labels WHERE org = :org AND key > found.value), n + 1
        FROM found WHERE found.value IS NOT NULL AND n < :limit
    )
    SELECT value FROM found WHERE value IS NOT NULL
    """
)
_DISTINCT_LABEL_VALUES = text(
    """
    WITH RECURSIVE found(value, n) AS (
        SELECT (SELECT MIN(value) FROM data_labels WHERE org = :org AND key = :key), 1
        UNION ALL
        SELECT (SELECT MIN(value) FROM data_labels
                WHERE org = :org AND key = :key AND value > found.value),
               n + 1
        FROM found WHERE found.value IS NOT NULL AND n < :limit
    )
    SELECT value FROM found WHERE value IS NOT NULL
    """
)
# Tags: the same walk over data_tags' (org, tag) index.
_DISTINCT_TAGS = text(
    """
    WITH RECURSIVE found(value, n) AS (
        SELECT (SELECT MIN(tag) FROM data_tags WHERE org = :org), 1
        UNION ALL
        SELECT (SELECT MIN(tag) FROM data_tags WHERE org = :org AND tag > found.value), n + 1
        FROM found WHERE found.value IS NOT NULL AND n < :limit
    )
    SELECT value FROM found WHERE value IS NOT NULL
    """
)


# Text fields with an index led by (org, field): their distinct values are cheap to list.
FACET_FIELDS = frozenset({"manufacturer", "reference", "custom_id"})

# See _choose_label_plans: about where the two plans cost the same on a million items.
_FEW_LABELS = 5000
_EVENTS_LOCK = 0x6D6C6B65  # "mlke": the advisory lock that orders event commits
_LOCK_EVENT_ORDER = text("SELECT pg_advisory_xact_lock(:key)")
# Concurrent adds committed together at most; bounded so that one transaction stays short.
_MAX_BATCH = 256
# The longest a batch waits for adds on their way (see SqlCatalog._gather_adds). On the 2-vCPU
# dev VM (SQLite commits of 5-15 ms under load), waiting up to 5 ms made batches of 16 concurrent
# uploads 2.5 items instead of 1.5 and the server's CPU per small file 4-13% lower; 10 ms did
# less well. On PostgreSQL, commits are quicker and so are the waits.
_MAX_LINGER = 0.005

# The write path's statements, built once: SQLAlchemy compiles each once and reuses it, and
# executemany sends every row of a batch through it.
_DATA_ROW: dict[str, Any] = dict.fromkeys(c.name for c in data_table.columns)
_INSERT_DATA = insert(data_table)
_INSERT_TAGS = insert(data_tags_table)
_INSERT_EVENTS = insert(events_table)
_INSERT_EVENTS_RETURNING = insert(events_table).returning(
    events_table.c.seq, sort_by_parameter_order=True
)
_INSERT_EVENT_TAGS = insert(event_tags_table)
_INSERT_LABELS = insert(data_labels_table)
_INSERT_EVENT_LABELS = insert(event_labels_table)


class _BulkInsert:
    """An INSERT of every row of a batch, compiled once for the engine's dialect and sent with
    the driver's own executemany (exec_driver_sql): per row, only the dialect's own value
    conversions (SQLite's float coercion), none of SQLAlchemy's per-statement work."""

    def __init__(self, statement: Insert, dialect: Dialect) -> None:
        keys = [c.key for c in statement.table.columns if c is not events_table.c.seq]
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        self._sql = compiled.string
        self._processors: list[tuple[str, Callable[[Any], Any]]] = []
        for name, process in compiled._bind_processors.items():
            if not callable(process):  # per-element processors: only for tuple types
                raise TypeError(f"column {name} needs a conversion _BulkInsert does not do")
            self._processors.append((name, process))
        self._names = list(compiled.positiontup or []) if compiled.positional else None

    def run(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        for name, process in self._processors:
            for row in rows:
                row[name] = process(row[name])
        if self._names is None:
            connection.exec_driver_sql(self._sql, rows)
        else:
            names = self._names
            connection.exec_driver_sql(self._sql, [tuple(row[n] for n in names) for row in rows])


_FINISH_UPLOAD = (
    update(uploads_table)
    .where(uploads_table.c.staging_key == bindparam("b_staging_key"))
    .values(data_id=bindparam("b_data_id"))
)
_FIND_REQUESTS = select(data_table).where(
    data_table.c.org == bindparam("org"),
    data_table.c.request_id.in_(bindparam("request_ids", expanding=True)),
)
_QUOTA = func.coalesce(organizations_table.c.storage_quota, bindparam("b_quota", type_=BigInteger))
_COUNT_BYTES = (
    update(organizations_table)
    .where(
        organizations_table.c.org == bindparam("b_org"),
        or_(
            _QUOTA.is_(None),
            organizations_table.c.used_bytes + bindparam("b_size", type_=BigInteger) <= _QUOTA,
        ),
    )
    .values(used_bytes=organizations_table.c.used_bytes + bindparam("b_size", type_=BigInteger))
)
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:id)")
_UNLOCK = text("SELECT pg_advisory_unlock(:id)")


def _each_waiter(error: Exception) -> Exception:
    """One waiter's exception for a batch that failed with `error`."""
    fault = backend_fault(error)
    if fault is None:
        return error  # a bug, not the backend: every waiter reports the same one
    fault.__cause__ = error
    return fault


class _AdvisoryLocks:
    """PostgreSQL session advisory locks, all on one connection of their own.

    One connection for every lock this process holds, outside the catalog's pool, rather than
    a connection per holder: a holder waits for its catalog commit, and holders each taking a
    pooled connection ran the pool dry under 16 concurrent uploads (none left to commit with).
    A pool of lock connections of their own would not deadlock, but would cost one PostgreSQL
    connection per concurrent upload and worker (its 16th holder waiting for the pool), where
    this costs one per process, whatever the concurrency. A session lock is re-entrant within
    its session, so holders of one key in this process queue here first.
    """

    def __init__(self, engine: Engine) -> None:
        # Unpooled: the one connection is opened here on first use, closed when it broke.
        self._engine = create_engine(
            engine.url, poolclass=NullPool, connect_args=_connect_defaults(engine.url)
        )
        self._connection: Connection | None = None
        self._use = threading.Lock()  # one statement at a time on the connection
        self._local = KeyedLocks()

    @asynccontextmanager
    async def hold(self, lock_id: int) -> AsyncIterator[None]:
        async with self._local.hold(str(lock_id)):
            # Polled rather than a blocking call, so that waiters do not pin worker threads:
            # the lock lives in PostgreSQL, there is no local event to wait on.
            while not await asyncio.to_thread(self._try_lock, lock_id):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            try:
                yield
            finally:
                await asyncio.shield(asyncio.to_thread(self._unlock, lock_id))

    def _try_lock(self, lock_id: int) -> bool:
        with self._use:
            while True:
                fresh = self._connection is None
                try:
                    return bool(self._session().execute(_TRY_LOCK, {"id": lock_id}).scalar())
                except DBAPIError:
                    self._drop()
                    # The pool's pre-ping, for the one connection kept out of the pool: one
                    # that died while it sat there (the catalog restarted, a proxy cut it) is
                    # replaced once; a new one failing means the catalog is away.
                    if fresh:
                        raise

    def _unlock(self, lock_id: int) -> None:
        with self._use:
            try:
                self._session().execute(_UNLOCK, {"id": lock_id})
            except DBAPIError:
                # A broken connection took its session's locks with it: nothing to release.
                log.warning("could not release blob lock %d; reconnecting", lock_id)
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


def _item(org: str, data_id: str) -> ColumnElement[bool]:
    """One item, as seen from one organization: another's items do not exist for it."""
    return and_(data_table.c.id == data_id, data_table.c.org == org)


def _driving_label(query: ListQuery) -> LabelMatch | None:
    """A `labels.k = "v"` (or `labels.k:*`) the whole filter requires, when the page is in the
    default order. An equality is preferred: it selects fewer rows."""
    if [(k.field, k.descending) for k in query.order] != [("created_at", False), ("id", False)]:
        return None
    where = query.where
    terms = list(where.clauses) if isinstance(where, BooleanClauseList) else [where]
    if isinstance(where, BooleanClauseList) and where.operator is not operators.and_:
        return None
    found: list[LabelMatch] = []
    for term in terms:
        # and_() wraps a condition of its own kind in AsBoolean (is_true); NOT wraps it too
        # (is_false), and must not drive.
        inner = term
        if isinstance(term, AsBoolean):
            inner = term.element if term.operator is operators.is_true else None
        if isinstance(inner, LabelMatch):
            found.append(inner)
    found.sort(key=lambda match: match.value is None)
    return found[0] if found else None


def _pages_by_label(org: str, query: ListQuery, driver: LabelMatch) -> Any:
    """The page, read from the labels' (org, key, value, created_at, data_id) index in order:
    the label's items arrive already sorted, so only a page's worth is read, whether the label
    is on 90% of the items or on 0.01%. The filter's other terms apply to each row; the label
    term itself is the join (repeating it would only mislead the planner's row estimates)."""
    labels = data_labels_table.c
    conditions: list[ColumnElement[bool]] = [
        labels.org == org,
        labels.key == driver.key,
        data_table.c.org == org,
    ]
    if driver.value is not None:
        conditions.append(labels.value == driver.value)
    where = query.where
    if isinstance(where, BooleanClauseList):
        conditions += [
            term
            for term in where.clauses
            if not (isinstance(term, AsBoolean) and term.element is driver)
        ]
    if query.cursor is not None:
        created_at, data_id = query.cursor
        conditions.append(tuple_(labels.created_at, labels.data_id) > tuple_(created_at, data_id))
    return (
        select(data_table)
        .join(data_labels_table, labels.data_id == data_table.c.id)
        .where(*conditions)
        .order_by(labels.created_at, labels.data_id)
        .limit(query.page_size + 1)
    )


def _insert_labels(
    connection: Connection, table: Table, owner: dict[str, Any], labels: dict[str, str]
) -> None:
    if labels:
        connection.execute(
            insert(table), [{**owner, "key": k, "value": v} for k, v in labels.items()]
        )


def _labels_of(
    connection: Connection, owner: Column[Any], owners: list[Any]
) -> dict[Any, dict[str, str]]:
    """The labels of each of `owners` (items or events), keys in order."""
    found: dict[Any, dict[str, str]] = {}
    table = owner.table
    statement = (
        select(owner, table.c.key, table.c.value)
        .where(owner.in_(owners))
        .order_by(owner, table.c.key)
    )
    for who, key, value in connection.execute(statement):
        found.setdefault(who, {})[key] = value
    return found


def _change_labels(connection: Connection, row: RowMapping, change: LabelChange) -> None:
    """Apply a label update to the item of `row` in the caller's transaction; refuse one that
    leaves too many."""
    table = data_labels_table
    data_id = row["id"]
    mine = table.c.data_id == data_id
    if change.replace:
        connection.execute(delete(table).where(mine))
    else:
        gone = [*change.remove, *change.set]
        if gone:
            connection.execute(delete(table).where(mine, table.c.key.in_(gone)))
    owner = {"data_id": data_id, "org": row["org"], "created_at": row["created_at"]}
    _insert_labels(connection, table, owner, change.set)
    count = connection.execute(select(func.count()).select_from(table).where(mine)).scalar_one()
    if count > MAX_LABELS:
        raise invalid_field(
            "labels", f"an item has at most {MAX_LABELS} labels; this makes {count}"
        )


def _check_etag(row: RowMapping, etag: str) -> None:
    if etag and etag != f'"{row["revision"]}"':
        raise EtagMismatch(
            f'data {row["id"]!r} changed since etag {etag} was read (now "{row["revision"]}"):'
            " get it again and reapply the change"
        )


def _sqlite_file(engine: Engine) -> Path | None:
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


# Row <-> record.


def _to_micros(value: datetime) -> int:
    """Microseconds since the epoch; a naive value is taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return (value - _EPOCH) // _ONE_MICROSECOND


def _from_micros(micros: int) -> datetime:
    return (_EPOCH + timedelta(microseconds=micros)).replace(tzinfo=UTC)


def _metadata_columns(name: str, value: object) -> dict[str, Any]:
    if name == "acquired_at":
        if value is None:
            return {"acquired_at": None, "acquired_at_offset": None}
        assert isinstance(value, datetime)
        offset = value.utcoffset()
        return {
            "acquired_at": _to_micros(value),
            "acquired_at_offset": None if offset is None else int(offset.total_seconds()),
        }
    return {name: value}


def _record_to_row(record: DataRecord) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": record.id,
        "org": record.org,
        "filename": record.filename,
        "size": record.size,
        "sha256": record.sha256,
        "content_type": record.content_type,
        "blob_key": record.blob_key,
        "created_at": _to_micros(record.created_at),
        "updated_at": _to_micros(record.updated_at),
        "metadata_sources": json.dumps(record.metadata_sources, sort_keys=True),
        "revision": record.revision,
        "request_id": record.request_id or None,
    }
    for name, value in record.metadata.items():
        row.update(_metadata_columns(name, value))
    return row


def _thumbnail_from_row(row: RowMapping) -> ThumbnailRecord:
    return ThumbnailRecord(**{**row, "created_at": _from_micros(row["created_at"])})


def _upload_from_row(row: RowMapping) -> UploadRecord:
    return UploadRecord(
        org=row["org"],
        id=row["id"],
        staging_key=row["staging_key"],
        header=row["header"],
        committed_size=row["committed_size"],
        created_at=_from_micros(row["created_at"]),
        expires_at=_from_micros(row["expires_at"]),
        data_id=row["data_id"] or "",
    )


def _row_to_record(
    row: RowMapping, tags: tuple[str, ...], labels: dict[str, str] | None = None
) -> DataRecord:
    metadata: MetadataDict = {}
    for name in FIELDS:
        if name == "acquired_at":
            micros = row["acquired_at"]
            if micros is None:
                continue
            wall = _EPOCH + timedelta(microseconds=micros)
            offset = row["acquired_at_offset"]
            if offset is None:
                metadata[name] = wall
            else:
                zone = timezone(timedelta(seconds=offset))
                metadata[name] = wall.replace(tzinfo=UTC).astimezone(zone)
        elif row[name] is not None:
            metadata[name] = float(row[name]) if name in FLOAT_FIELDS else str(row[name])
    return DataRecord(
        id=row["id"],
        org=row["org"],
        filename=row["filename"],
        size=row["size"],
        sha256=row["sha256"],
        content_type=row["content_type"],
        blob_key=row["blob_key"],
        created_at=_from_micros(row["created_at"]),
        updated_at=_from_micros(row["updated_at"]),
        metadata=metadata,
        metadata_sources=json.loads(row["metadata_sources"]),
        tags=tags,
        revision=row["revision"],
        request_id=row["request_id"] or "",
        labels=labels or {},
    )
