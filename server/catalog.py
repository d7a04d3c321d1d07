"""The catalog: one row per data item, its metadata in typed, indexed columns.

`SqlCatalog` runs on any engine SQLAlchemy speaks; SQLite is the embedded default. Calls are
synchronous SQLAlchemy Core run in worker threads, so the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    RowMapping,
    Table,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import AsBoolean, BooleanClauseList, ColumnElement

from metalake.labels import MAX_LABELS
from metalake.metadata import FIELDS, FLOAT_FIELDS, MetadataDict
from metalake.server.errors import (
    ConflictError,
    NotFoundError,
    ResourceExhaustedError,
    invalid_field,
)
from metalake.server.filtering import EVENTS, FilterError, LabelMatch, compile_filter
from metalake.server.paging import ListQuery
from metalake.server.schema import (
    data_labels_table,
    data_table,
    data_tags_table,
    event_labels_table,
    event_log_table,
    event_tags_table,
    events_table,
    organizations_table,
    tokens_table,
    uploads_table,
)
from metalake.server.schema_versions import check_schema, engine_url

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

    async def imported_under(self, org: str, request_prefix: str) -> list[tuple[str, str]]: ...

    async def replace_content(self, org: str, record: DataRecord) -> DataRecord: ...


class SqlCatalog:
    """A catalog on a SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # SQLite allows one writer; serialising writes here avoids its lock-upgrade deadlocks,
        # and lets concurrent adds share one commit (see _flush_adds).
        self._write_lock: threading.Lock | None = (
            threading.Lock() if engine.dialect.name == "sqlite" else None
        )
        self._pending_adds: list[_PendingAdd] = []
        self._known_organizations: set[str] = set()
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, url: str, *, migrate: bool = False) -> SqlCatalog:
        """Connect to the catalog at `url`, refusing a schema this server does not expect.

        With `migrate`, an older or empty schema is first brought up to date.
        """
        url = engine_url(url)
        # A pre-ping per checkout guards against dropped server connections; a SQLite file has
        # none to drop, and the ping would cost a round trip per query.
        engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
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

        On PostgreSQL, a session advisory lock, taken with polling rather than a blocking call
        so that waiters do not pin worker threads. SQLite serves one server: nothing to do.
        """
        if self._engine.dialect.name != "postgresql":
            yield
            return
        lock_id = int(blob_key[:15], 16)
        connection = await asyncio.to_thread(self._engine.connect)
        try:
            # The lock lives in PostgreSQL, so there is no local event to wait on: poll it.
            while not await asyncio.to_thread(  # noqa: ASYNC110
                lambda: connection.execute(select(func.pg_try_advisory_lock(lock_id))).scalar()
            ):
                await asyncio.sleep(0.01)
            try:
                yield
            finally:
                await asyncio.shield(
                    asyncio.to_thread(
                        lambda: connection.execute(select(func.pg_advisory_unlock(lock_id)))
                    )
                )
        finally:
            await asyncio.shield(asyncio.to_thread(connection.close))

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)

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
                    raise NotFoundError(record.id)
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
        else `default_quota`); with `upload`, also mark that resumable upload finished by it."""
        if self._write_lock is None:
            await self._run(lambda: self._add(record, upload, default_quota), write=True)
            return
        pending = _PendingAdd(
            record, upload, default_quota, asyncio.get_running_loop().create_future()
        )
        self._pending_adds.append(pending)
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.create_task(self._flush_adds())
        await pending.done

    async def _flush_adds(self) -> None:
        """Commit queued adds in batches: while one batch commits, the next one gathers."""
        try:
            while self._pending_adds:
                batch, self._pending_adds = self._pending_adds[:256], self._pending_adds[256:]
                try:
                    outcomes = await self._run(
                        functools.partial(self._add_batch, batch), write=True
                    )
                except Exception as error:
                    outcomes = [error] * len(batch)
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
        statement = select(data_table.c.id).where(data_table.c.blob_key == blob_key).limit(1)
        return await self._run(lambda: self._scalar(statement) is not None)

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

    def _add(
        self, record: DataRecord, upload: UploadRecord | None, default_quota: int | None
    ) -> None:
        try:
            with self._engine.begin() as connection:
                refused = self._insert_item(connection, record, upload, default_quota)
                if refused is not None:
                    raise refused
            self._known_organizations.add(record.org)
        except IntegrityError:
            # The unique request id is the arbiter between concurrent retries of one upload.
            existing = (
                self._find_request(record.org, record.request_id) if record.request_id else None
            )
            if existing is None:
                raise
            raise DuplicateRequestError(existing) from None

    def _add_batch(self, items: list[_PendingAdd]) -> list[Exception | None]:
        """SQLite: many items in one transaction, so one fsync covers them all (group commit).

        Only one writer runs at a time here, so checking a request id before inserting is
        race-free, and a refused item changes nothing: the batch needs no savepoints.
        """
        with self._engine.begin() as connection:
            outcomes = [
                self._insert_item(connection, item.record, item.upload, item.default_quota)
                for item in items
            ]
        self._known_organizations.update(item.record.org for item in items)
        return outcomes

    def _insert_item(
        self,
        connection: Connection,
        record: DataRecord,
        upload: UploadRecord | None,
        default_quota: int | None,
    ) -> Exception | None:
        """Insert one item in the caller's transaction; an Exception (changing nothing) when
        it must be refused."""
        if record.request_id:
            row = (
                connection.execute(
                    select(data_table).where(
                        data_table.c.org == record.org,
                        data_table.c.request_id == record.request_id,
                    )
                )
                .mappings()
                .first()
            )
            if row is not None:
                return DuplicateRequestError(self._records(connection, [row])[0])
        self._ensure_organization(connection, record.org)
        organizations = organizations_table.c
        quota = func.coalesce(organizations.storage_quota, default_quota)
        # One conditional UPDATE: concurrent uploads of one organization (even through other
        # servers) cannot overshoot its quota together.
        counted = connection.execute(
            update(organizations_table)
            .where(
                organizations.org == record.org,
                or_(quota.is_(None), organizations.used_bytes + record.size <= quota),
            )
            .values(used_bytes=organizations.used_bytes + record.size)
        )
        if counted.rowcount == 0:
            return ResourceExhaustedError(
                f"storing {record.size} bytes would exceed the storage quota of "
                f"organization {record.org!r}"
            )
        connection.execute(insert(data_table).values(**_record_to_row(record)))
        if record.tags:
            connection.execute(
                insert(data_tags_table),
                [{"data_id": record.id, "tag": tag} for tag in record.tags],
            )
        _insert_labels(
            connection,
            data_labels_table,
            {"data_id": record.id, "org": record.org, "created_at": _to_micros(record.created_at)},
            record.labels,
        )
        if upload is not None:
            connection.execute(
                update(uploads_table)
                .where(uploads_table.c.staging_key == upload.staging_key)
                .values(data_id=record.id)
            )
        self._record_event(connection, EventType.CREATED, record, record.created_at)
        return None

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
                raise NotFoundError(data_id)
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
                raise NotFoundError(data_id)
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
                raise NotFoundError(data_id)
            _check_etag(row, etag)
            record = self._records(connection, [row])[0]
            connection.execute(
                update(organizations_table)
                .where(organizations_table.c.org == org)
                .values(used_bytes=organizations_table.c.used_bytes - record.size)
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
        if self._engine.dialect.name == "postgresql":
            # Sequence numbers are handed out at insert but become visible at commit; holding
            # this lock to the commit makes them visible in order, so a watcher that read up
            # to seq N never later finds a smaller one. SQLite serialises writes anyway.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EVENTS_LOCK})
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


# See _choose_label_plans: about where the two plans cost the same on a million items.
_FEW_LABELS = 5000
_EVENTS_LOCK = 0x6D6C6B65  # "mlke": the advisory lock that orders event commits


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
        raise ConflictError(
            f'data {row["id"]!r} changed since etag {etag} was read (now "{row["revision"]}"):'
            " get it again and reapply the change"
        )


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
