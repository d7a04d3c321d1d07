"""Items: storing them (concurrent adds committed together), reading, listing, updating and
deleting them. Every write keeps its organization's usage and records its event in the
same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import operator
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import Histogram
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    RowMapping,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import AsBoolean, BooleanClauseList, ColumnElement

from metalake.metadata import FIELDS, MetadataDict
from metalake.server.catalog.database import _sqlite_file
from metalake.server.catalog.events import EventType, SqlEventLog
from metalake.server.catalog.labels import LabelChange, _change_labels, _labels_of
from metalake.server.catalog.organizations import SqlOrganizationCatalog
from metalake.server.catalog.records import (
    DataRecord,
    _item,
    _metadata_columns,
    _record_to_row,
    _row_to_record,
    _to_micros,
)
from metalake.server.catalog.uploads import UploadRecord
from metalake.server.errors import EtagMismatch, LimitReached, NotFound
from metalake.server.faults import backend_fault
from metalake.server.filtering import LabelMatch
from metalake.server.paging import ListQuery
from metalake.server.schema import (
    data_labels_table,
    data_table,
    data_tags_table,
    dataset_items_table,
    event_labels_table,
    event_tags_table,
    events_table,
    organizations_table,
    thumbnails_table,
    uploads_table,
)


class DuplicateRequestError(Exception):
    """An item with this request id is already stored: `existing`."""

    def __init__(self, existing: DataRecord) -> None:
        self.existing = existing
        super().__init__(f"request id {existing.request_id!r} already stored as {existing.id}")


@dataclass(eq=False)
class _PendingAdd:
    record: DataRecord
    upload: UploadRecord | None
    default_quota: int | None
    # What the caller awaits: cancelled the moment the caller is, else the item's outcome.
    done: asyncio.Future[None]
    before_commit: Callable[[], None] | None = None
    # When it was queued, and for how long it had been on its way then (see _gather_adds).
    queued_at: float = 0.0
    on_its_way: float = 0.0
    # Set when a batch takes the item, done when that batch is over (it committed, or not): a
    # caller cancelled meanwhile waits on it.
    batch_over: asyncio.Future[None] | None = None


@dataclass(frozen=True)
class _PendingFind:
    org: str
    request_id: str
    found: asyncio.Future[DataRecord | None]


@dataclass(frozen=True)
class Page:
    records: list[DataRecord]
    next_page_token: str


class ItemCatalog(Protocol):
    """The items of each organization."""

    async def add(
        self,
        record: DataRecord,
        *,
        upload: UploadRecord | None = None,
        default_quota: int | None = None,
        before_commit: Callable[[], None] | None = None,
        on_its_way_since: float | None = None,
    ) -> None: ...

    def add_coming(self) -> AddComing: ...

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

    async def imported_under(self, org: str, request_prefix: str) -> list[tuple[str, str]]: ...

    async def replace_content(self, org: str, record: DataRecord) -> DataRecord: ...


class AddComing:
    """An add on its way to a SqlItemCatalog (see `add_coming`): over once `arrived` is called
    (just before the add, or when the upload will not add after all), or on leaving a `with`.
    `since` is when it was announced (time.monotonic()), for the add's `on_its_way_since`.
    """

    __slots__ = ("_catalog", "_over", "since")

    def __init__(self, catalog: SqlItemCatalog) -> None:
        self._catalog = catalog
        self._over = False
        self.since = time.monotonic()
        catalog._adds_coming += 1

    def arrived(self) -> None:
        if not self._over:
            self._over = True
            self._catalog._adds_coming -= 1
            # The add is queued next, or never comes (its upload failed): either way a batch
            # waiting for it may go on.
            self._catalog._wake_flusher()

    def __enter__(self) -> AddComing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.arrived()


class SqlItemCatalog(SqlOrganizationCatalog, SqlEventLog):
    """Items on the catalog's database, with their organization's usage and their events."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # Concurrent adds share one transaction and one commit (see _flush_adds).
        self._pending_adds: list[_PendingAdd] = []
        # Adds on their way (see add_coming), and how long the last batch took to commit.
        self._adds_coming = 0
        self._add_arrived: asyncio.Future[None] | None = None
        self._commit_seconds = 0.0
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None
        # Request id lookups asked meanwhile, answered together (see find_request).
        self._pending_finds: list[_PendingFind] = []
        self._finding = False
        self._finder: asyncio.Task[None] | None = None
        self._probe: _RequestProbe | None = None
        self._bulk_inserts: dict[Insert, _BulkInsert] = {}
        # A SQLite file: the connection batches commit on, kept (see _batch_transaction).
        self._keep_batch_connection = _sqlite_file(engine) is not None
        self._batch_connection: Connection | None = None

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
        before_commit: Callable[[], None] | None = None,
        on_its_way_since: float | None = None,
    ) -> None:
        """Store an item, counting its bytes against its organization's storage quota (its own,
        else `default_quota`); with `upload`, also mark that resumable upload finished by it.

        Returns once the item is committed. Concurrent adds are committed together (one
        transaction, one fsync), each still accepted or refused on its own.

        `before_commit` is a blocking step that must succeed before the item may be committed
        (its blob made durable: BlobStore.put_deferred); the batch runs it in its own thread,
        before taking the writer lock, so that one thread hop covers the blob and the row. If
        it raises, the item is refused with that error and nothing of it is committed.

        `on_its_way_since`: when the add was announced (AddComing.since), usually as its upload
        began; the batch it starts may then wait a share of that time for others (_gather_adds).
        """
        now = time.monotonic()
        pending = _PendingAdd(
            record,
            upload,
            default_quota,
            asyncio.get_running_loop().create_future(),
            before_commit,
            queued_at=now,
            on_its_way=0.0 if on_its_way_since is None else max(0.0, now - on_its_way_since),
        )
        self._pending_adds.append(pending)
        self._wake_flusher()
        if not self._flushing:
            self._flushing = True
            self._flusher = asyncio.create_task(self._flush_adds())
        try:
            await pending.done
        except asyncio.CancelledError:
            # The caller was cancelled (its client went away), and `done` with it. An item no
            # batch has taken is withdrawn: nothing of it commits. One whose batch is
            # committing may commit still: wait for the batch, so that a caller cleaning up
            # after the cancellation (deleting the item's blob unless an item uses it) finds
            # the item if it exists.
            if pending.batch_over is None:
                with contextlib.suppress(ValueError):
                    self._pending_adds.remove(pending)
            else:
                await pending.batch_over
            raise

    def add_coming(self) -> AddComing:
        """An add on its way (a small upload still arriving, a blob being stored) until it
        arrives or the upload gives up: meanwhile a batch about to commit waits a little for it
        (see _gather_adds)."""
        return AddComing(self)

    def _wake_flusher(self) -> None:
        if self._add_arrived is not None and not self._add_arrived.done():
            self._add_arrived.set_result(None)

    async def _gather_adds(self) -> None:
        """Before a batch commits, wait for the adds on their way, for as long as the last
        commit took (at most _MAX_LINGER), or, if longer, for a share of the time the batch's
        first add had been on its way (_LINGER_SHARE of it, at most _MAX_SLOW_LINGER).

        A commit costs about the same CPU (and an fsync) whatever its size, and concurrent
        uploads reach their add a few milliseconds apart: without waiting, 16 concurrent
        uploads committed 1.5 items per batch, and one stream with 16 small files in flight
        about 3. Waiting at most one commit's time costs an add at most that much latency, and
        those that arrive meanwhile would otherwise have waited for this commit to end before
        starting theirs. An add with none on its way does not wait.

        Uploads whose blobs go to remote object storage reach their add many milliseconds
        apart (each waits for its PUT), far more than a commit takes: over PostgreSQL + S3
        (moto), one stream of 16 small files in flight committed 2.4-2.6 items per batch.
        There the share holds a batch open longer, bounding what it costs an upload to a
        quarter of the time it had taken already.
        """
        now = time.monotonic()
        deadline = now + min(self._commit_seconds, _MAX_LINGER)
        if self._pending_adds:
            first = self._pending_adds[0]
            share = min(first.on_its_way * _LINGER_SHARE, _MAX_SLOW_LINGER)
            deadline = max(deadline, first.queued_at + share)
        loop = asyncio.get_running_loop()
        while self._adds_coming and len(self._pending_adds) < _MAX_BATCH:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._add_arrived = arrived = loop.create_future()
            # A timer that ends the wait, rather than asyncio.wait's: it builds a set, callbacks
            # and a task group per wait, and batches wait often.
            timer = loop.call_later(left, _wake, arrived)
            try:
                await arrived
            finally:
                timer.cancel()
                self._add_arrived = None

    async def _flush_adds(self) -> None:
        """Commit queued adds in batches: while one batch commits, the next one gathers."""
        try:
            while self._pending_adds:
                await self._gather_adds()
                batch = self._pending_adds[:_MAX_BATCH]
                self._pending_adds = self._pending_adds[_MAX_BATCH:]
                # Callers cancelled meanwhile withdraw their items (see `add`).
                batch = [item for item in batch if not _withdrawn(item)]
                if not batch:
                    continue
                loop = asyncio.get_running_loop()
                for item in batch:
                    item.batch_over = loop.create_future()
                started = time.monotonic()
                try:
                    outcomes = await asyncio.to_thread(self._prepare_and_add, batch)
                except Exception as error:
                    # Every add of the batch fails with it: each as the backend fault it is
                    # (UNAVAILABLE, RESOURCE_EXHAUSTED), each its own exception object, since
                    # one object raised in many tasks would pile their tracebacks up.
                    outcomes = [_each_waiter(error) for _ in batch]
                self._commit_seconds = time.monotonic() - started
                BATCH_ITEMS.observe(len(batch))
                BATCH_SECONDS.observe(self._commit_seconds)
                for item, outcome in zip(batch, outcomes, strict=True):
                    assert item.batch_over is not None
                    if not item.batch_over.done():  # a caller cancelled twice stops waiting
                        item.batch_over.set_result(None)
                    if item.done.done():
                        continue  # its upload was cancelled meanwhile
                    if outcome is None:
                        item.done.set_result(None)
                    else:
                        item.done.set_exception(outcome)
        finally:
            self._flushing = False

    async def get(self, org: str, data_id: str) -> DataRecord:
        return await self._run(lambda: self._get(org, data_id))

    async def list_page(
        self, org: str, *, filter: str, order_by: str, page_size: int, page_token: str
    ) -> Page:
        query = ListQuery.parse(filter, order_by, page_size, page_token)
        return await self._run(lambda: self._list(org, query))

    async def find_request(self, org: str, request_id: str) -> DataRecord | None:
        """The item stored under this request id, if any.

        Every upload a client retries safely asks this first, so concurrent lookups share one
        worker thread hop and one query per organization (see _flush_finds).
        """
        pending = _PendingFind(org, request_id, asyncio.get_running_loop().create_future())
        self._pending_finds.append(pending)
        if not self._finding:
            self._finding = True
            self._finder = asyncio.create_task(self._flush_finds())
        return await pending.found

    async def _flush_finds(self) -> None:
        """Answer queued lookups in batches: those asked while one batch runs go together in the
        next. Nothing waits on purpose: a lookup alone is answered at once."""
        try:
            while self._pending_finds:
                batch = self._pending_finds[:_MAX_BATCH]
                self._pending_finds = self._pending_finds[_MAX_BATCH:]
                wanted = [(find.org, find.request_id) for find in batch]
                try:
                    stored = await self._run(functools.partial(self._find_requests, wanted))
                except Exception as error:
                    for find in batch:
                        if not find.found.done():
                            find.found.set_exception(_each_waiter(error))
                    continue
                for find in batch:
                    if not find.found.done():  # its upload was cancelled meanwhile
                        find.found.set_result(stored.get((find.org, find.request_id)))
        finally:
            self._finding = False

    def _find_requests(
        self, wanted: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], DataRecord]:
        with self._engine.connect() as connection:
            return self._requests_stored(connection, wanted)

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

    # Synchronous halves, run in worker threads.

    def _prepare_and_add(self, items: list[_PendingAdd]) -> list[Exception | None]:
        """Each item's `before_commit` (outside the writer lock: another process's batch need not
        wait for this one's blobs), then the items whose step succeeded, in one transaction."""
        outcomes: list[Exception | None] = [None] * len(items)
        for index, item in enumerate(items):
            if item.before_commit is not None:
                try:
                    item.before_commit()
                except Exception as error:
                    outcomes[index] = _each_waiter(error)
            if outcomes[index] is None and _withdrawn(item):
                # Cancelled while its blob was made durable: still nothing of it commits (its
                # caller deletes the blob). Read from this thread, a cancellation may be seen
                # late; then the item commits, as one cancelled a moment later would.
                outcomes[index] = _Withdrawn()
        ready = [index for index, outcome in enumerate(outcomes) if outcome is None]
        if ready:
            add = self._under_write_lock(
                functools.partial(self._add_batch, [items[index] for index in ready])
            )
            for index, outcome in zip(ready, add(), strict=True):
                outcomes[index] = outcome
        return outcomes

    def _add_batch(self, items: list[_PendingAdd]) -> list[Exception | None]:
        """Many items in one transaction, so one commit (one fsync) covers them all.

        An item refused for its request id or its quota changes nothing, so the others commit.
        If the database rejects the batch (a constraint one item violates, or a request id
        another server stored meanwhile), each item is tried again in a transaction of its
        own: only the item at fault fails.
        """
        try:
            with self._batch_transaction() as connection:
                outcomes = self._insert_batch(connection, items)
        except (IntegrityError, DataError):
            return [self._add_alone(item) for item in items]
        self._known_organizations.update(item.record.org for item in items)
        return outcomes

    @contextmanager
    def _batch_transaction(self) -> Iterator[Connection]:
        """A transaction for a batch of adds, committed on leaving.

        On a SQLite file, always on the same connection, kept open: a connection's page cache holds
        until another connection writes, so a batch finds the pages the previous one touched
        (index leaves, the organization's row) in memory, where a pooled connection, last used
        before other batches, would read them all again; nor is it checked out and reset per
        batch. Batches run one at a time under the writer lock, so one connection is enough.
        Elsewhere (PostgreSQL), a pooled connection, whose pre-ping notices a lost server.
        """
        if not self._keep_batch_connection:
            with self._engine.begin() as connection:
                yield connection
            return
        if self._batch_connection is None:
            self._batch_connection = self._engine.connect()
        connection = self._batch_connection
        try:
            with connection.begin():
                yield connection
        except (IntegrityError, DataError):
            raise  # an item's fault: rolled back, the connection is sound
        except BaseException:
            # Whatever broke (a full disk, an I/O error), the next batch starts afresh.
            self._batch_connection = None
            with contextlib.suppress(Exception):
                connection.close()
            raise

    def _close_batch_connection(self) -> None:
        if self._batch_connection is not None:
            self._batch_connection.close()
            self._batch_connection = None

    async def close(self) -> None:
        if self._batch_connection is not None:
            await self._run(self._close_batch_connection, write=True)
        await super().close()

    def _add_alone(self, item: _PendingAdd) -> Exception | None:
        record = item.record
        try:
            with self._batch_transaction() as connection:
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
        stored = self._requests_stored(
            connection,
            [(item.record.org, item.record.request_id) for item in items if item.record.request_id],
        )
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

    def _requests_stored(
        self, connection: Connection, wanted: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], DataRecord]:
        """The items already stored under these (org, request id): one query per org."""
        by_org: defaultdict[str, set[str]] = defaultdict(set)
        for org, request_id in wanted:
            by_org[org].add(request_id)
        stored = {}
        for org, request_ids in by_org.items():
            # Most lookups find nothing: ask the (org, request_id) index which exist, and read
            # only those items.
            present = self._request_probe().run(connection, org, sorted(request_ids))
            if not present:
                continue
            rows = list(
                connection.execute(_FIND_REQUESTS, {"org": org, "request_ids": present}).mappings()
            )
            for found in self._records(connection, rows):
                stored[(found.org, found.request_id)] = found
        return stored

    def _request_probe(self) -> _RequestProbe:
        if self._probe is None:
            self._probe = _RequestProbe(self._engine.dialect)
        return self._probe

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
# Concurrent adds committed together at most; bounded so that one transaction stays short.
_MAX_BATCH = 256

# Group commit as an operator sees it (docs/operations.md, "Observing it"): few items per batch
# under load mean a commit's fixed cost (its fsyncs, its round trips) is shared by few files.
BATCH_ITEMS = Histogram(
    "metalake_catalog_batch_items",
    "Items committed together in one catalog transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_SECONDS = Histogram(
    "metalake_catalog_batch_duration_seconds",
    "Time one batch of catalog adds took: its blobs made durable, its transaction committed.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
# The longest a batch waits for adds on their way (see SqlItemCatalog._gather_adds). On the 2-vCPU
# dev VM (SQLite commits of 5-15 ms under load), waiting up to 5 ms made batches of 16 concurrent
# uploads 2.5 items instead of 1.5 and the server's CPU per small file 4-13% lower; 10 ms did
# less well. On PostgreSQL, commits are quicker and so are the waits.
_MAX_LINGER = 0.005
# Or, if longer, this share of the time the batch's first add had been on its way (its upload's
# PUT to object storage, mostly), at most _MAX_SLOW_LINGER: over PostgreSQL + S3 (moto), batches
# of 2.5 -> 3.8 items, CPU per file 0.74-1.02 of before (thread_split, five pairs). A fixed
# 20 ms saved more but would cost a quick upload as much as a slow one; a share of 0.5 did no
# better.
_LINGER_SHARE = 0.25
_MAX_SLOW_LINGER = 0.05

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
        names = list(compiled.positiontup or []) if compiled.positional else None
        # A positional driver's parameters, each row's values in the statement's order: taken
        # in C (the data table has some sixty columns; a generator per row cost ~10 us).
        self._values: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
        if names is not None:
            self._values = _values_in_order(names)

    def run(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        for name, process in self._processors:
            for row in rows:
                row[name] = process(row[name])
        if self._values is None:
            connection.exec_driver_sql(self._sql, rows)
        else:
            connection.exec_driver_sql(self._sql, list(map(self._values, rows)))


class _RequestProbe:
    """Which of an organization's request ids are stored: a query on the (org, request_id)
    index alone, compiled once per number of ids for the engine's dialect and sent with the
    driver's own execute, without SQLAlchemy's per-statement work (expanding the IN list,
    result processing), which cost more than the query."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[int, tuple[str, list[str] | None]] = {}

    def run(self, connection: Connection, org: str, request_ids: list[str]) -> list[str]:
        count = len(request_ids)
        compiled = self._compiled.get(count)
        if compiled is None:
            compiled = self._compiled[count] = self._compile(count)
        sql, names = compiled
        values = {"org": org} | {f"r{i}": rid for i, rid in enumerate(request_ids)}
        parameters = values if names is None else tuple(values[name] for name in names)
        return [row[0] for row in connection.exec_driver_sql(sql, parameters)]

    def _compile(self, count: int) -> tuple[str, list[str] | None]:
        statement = select(data_table.c.request_id).where(
            data_table.c.org == bindparam("org"),
            data_table.c.request_id.in_([bindparam(f"r{i}") for i in range(count)]),
        )
        compiled = statement.compile(dialect=self._dialect)
        if compiled._bind_processors:
            raise TypeError("a request id lookup needs conversions _RequestProbe does not do")
        names = list(compiled.positiontup or []) if compiled.positional else None
        return compiled.string, names


def _values_in_order(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda row: tuple(row[name] for name in names)  # itemgetter of one is no tuple


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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Withdrawn(Exception):
    """An add whose caller was cancelled before its item committed: nothing of it was."""


def _withdrawn(item: _PendingAdd) -> bool:
    """Whether the caller of this add was cancelled (before its item committed)."""
    return item.done.cancelled()


def _each_waiter(error: Exception) -> Exception:
    """One waiter's exception for a batch that failed with `error`."""
    fault = backend_fault(error)
    if fault is None:
        return error  # a bug, not the backend: every waiter reports the same one
    fault.__cause__ = error
    return fault


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


def _check_etag(row: RowMapping, etag: str) -> None:
    if etag and etag != f'"{row["revision"]}"':
        raise EtagMismatch(
            f'data {row["id"]!r} changed since etag {etag} was read (now "{row["revision"]}"):'
            " get it again and reapply the change"
        )
