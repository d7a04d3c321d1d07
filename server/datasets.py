"""Dataset snapshots: immutable, versioned selections of items (after Picsellia's
DatasetVersion and DVC/lakeFS commits).

Creating a version copies the matching data rows, their tags and their labels, in one consistent
read, into `dataset_items`, `dataset_item_tags` and `dataset_item_labels`: the copy is never
updated, so a version lists, diffs and exports the same way a month later. A frozen item keeps its
blob alive (the catalog's `blob_in_use` counts it), so a version can still be downloaded after its
items were deleted.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, String, and_, func, insert, literal, select
from sqlalchemy.exc import IntegrityError, OperationalError

from metalake.metadata import FieldViolation
from metalake.server import importing
from metalake.server.blobstore import BlobStore
from metalake.server.catalog import DataRecord, SqlCatalog, _from_micros, _row_to_record, _to_micros
from metalake.server.datalake import Download
from metalake.server.errors import InvalidRequest, NotFound, invalid_field
from metalake.server.filtering import FilterError, compile_filter
from metalake.server.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from metalake.server.schema import (
    data_labels_table,
    data_table,
    data_tags_table,
    dataset_item_labels_table,
    dataset_item_tags_table,
    dataset_items_table,
    dataset_versions_table,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_DESCRIPTION = 1024
# Rows read at a time when walking two versions side by side.
_DIFF_BATCH = 500
_SERIALIZATION_FAILURE = "40001"


@dataclass(frozen=True)
class DatasetVersion:
    id: str
    org: str
    name: str
    version: int
    filter: str
    description: str
    created_at: datetime
    item_count: int
    total_size: int


class Change:
    ADDED = 1
    REMOVED = 2
    CHANGED = 3


@dataclass(frozen=True)
class DiffEntry:
    change: int
    data_id: str
    before: DataRecord | None
    after: DataRecord | None


class Datasets:
    """Dataset versions of every organization, over the shared catalog and blob store."""

    def __init__(self, catalog: SqlCatalog, blobs: BlobStore, *, download_chunk_size: int) -> None:
        self._catalog = catalog
        self._engine = catalog.engine
        self._blobs = blobs
        # Reads the objects of items registered in place (ImportObjects).
        self._bucket_reader = importing.LazyReader()
        self._download_chunk_size = download_chunk_size

    async def create(
        self, org: str, name: str, filter: str, description: str = ""
    ) -> DatasetVersion:
        """Freeze the organization's items matching `filter` as the next version of `name`."""
        violations = _name_violations(name)
        if len(description) > MAX_DESCRIPTION or "\x00" in description:
            violations.append(
                FieldViolation("description", f"at most {MAX_DESCRIPTION} characters, no NUL")
            )
        if violations:
            raise InvalidRequest("the dataset request is invalid", violations)
        try:
            where = compile_filter(filter)
        except FilterError as error:
            raise invalid_field("filter", str(error)) from None
        for _ in range(5):
            try:
                return await self._catalog.run(
                    lambda: self._create(org, name, filter, description, where), write=True
                )
            except IntegrityError:
                continue  # another server took this version number: take the next one
            except OperationalError as error:
                if getattr(error.orig, "sqlstate", None) != _SERIALIZATION_FAILURE:
                    raise
                continue  # an item changed under the snapshot: freeze again
        raise RuntimeError(f"could not allocate a version of dataset {name!r}")

    def _create(
        self, org: str, name: str, filter: str, description: str, where: Any
    ) -> DatasetVersion:
        versions = dataset_versions_table.c
        dataset_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        # One snapshot of the data for the rows, their tags and labels (SQLite: the write lock
        # is held).
        connection_options: dict[str, Any] = (
            {"isolation_level": "REPEATABLE READ"}
            if self._engine.dialect.name == "postgresql"
            else {}
        )
        connection = self._engine.connect().execution_options(**connection_options)
        with connection, connection.begin():
            latest = connection.execute(
                select(func.max(versions.version)).where(versions.org == org, versions.name == name)
            ).scalar()
            version = int(latest or 0) + 1
            connection.execute(
                insert(dataset_versions_table).values(
                    dataset_id=dataset_id,
                    org=org,
                    name=name,
                    version=version,
                    filter=filter,
                    description=description,
                    created_at=_to_micros(now),
                    item_count=0,
                    total_size=0,
                )
            )
            conditions = [data_table.c.org == org]
            if where is not None:
                conditions.append(where)
            if self._engine.dialect.name == "postgresql":
                # Share-lock the rows being frozen: a concurrent delete waits for this commit,
                # so its blob check sees the frozen copy (and a delete that committed after
                # this snapshot began fails it with a serialization error: retried).
                connection.execute(
                    select(data_table.c.id).where(and_(*conditions)).with_for_update(read=True)
                )
            columns = [c.name for c in data_table.columns]
            connection.execute(
                insert(dataset_items_table).from_select(
                    ["dataset_id", *columns],
                    select(literal(dataset_id, String(36)), *data_table.c).where(and_(*conditions)),
                )
            )
            items = dataset_items_table.c
            connection.execute(
                insert(dataset_item_tags_table).from_select(
                    ["dataset_id", "data_id", "tag"],
                    select(items.dataset_id, data_tags_table.c.data_id, data_tags_table.c.tag)
                    .join(dataset_items_table, items.id == data_tags_table.c.data_id)
                    .where(items.dataset_id == dataset_id),
                )
            )
            labels = data_labels_table.c
            connection.execute(
                insert(dataset_item_labels_table).from_select(
                    ["dataset_id", "data_id", "key", "value"],
                    select(items.dataset_id, labels.data_id, labels.key, labels.value)
                    .join(dataset_items_table, items.id == labels.data_id)
                    .where(items.dataset_id == dataset_id),
                )
            )
            count, size = connection.execute(
                select(func.count(), func.coalesce(func.sum(items.size), 0)).where(
                    items.dataset_id == dataset_id
                )
            ).one()
            connection.execute(
                dataset_versions_table.update()
                .where(versions.dataset_id == dataset_id)
                .values(item_count=count, total_size=size)
            )
        return DatasetVersion(
            dataset_id, org, name, version, filter, description, now, int(count), int(size)
        )

    async def versions(
        self, org: str, *, name: str, page_size: int, page_token: str
    ) -> tuple[list[DatasetVersion], str]:
        """Versions by name, newest first within a name."""
        size = _page_size(page_size)
        after = _decode_token(page_token, f"list:{name}")
        versions = dataset_versions_table.c
        statement = select(dataset_versions_table).where(versions.org == org)
        if name:
            statement = statement.where(versions.name == name)
        if after is not None:
            after_name, after_version = after
            statement = statement.where(
                (versions.name > after_name)
                | and_(versions.name == after_name, versions.version < after_version)
            )
        statement = statement.order_by(versions.name, versions.version.desc()).limit(size + 1)

        def work() -> list[DatasetVersion]:
            with self._engine.connect() as connection:
                return [_version(row) for row in connection.execute(statement).mappings()]

        found = await self._catalog.run(work)
        token = ""
        if len(found) > size:
            found = found[:size]
            token = _encode_token(f"list:{name}", [found[-1].name, found[-1].version])
        return found, token

    async def get(self, org: str, name: str, version: int) -> DatasetVersion:
        violations = _name_violations(name)
        if version < 0:
            violations.append(FieldViolation("version", "must not be negative"))
        if violations:
            raise InvalidRequest("the dataset request is invalid", violations)
        versions = dataset_versions_table.c
        statement = select(dataset_versions_table).where(versions.org == org, versions.name == name)
        if version:
            statement = statement.where(versions.version == version)
        statement = statement.order_by(versions.version.desc()).limit(1)

        def work() -> DatasetVersion | None:
            with self._engine.connect() as connection:
                row = connection.execute(statement).mappings().first()
            return _version(row) if row is not None else None

        found = await self._catalog.run(work)
        if found is None:
            label = f"{name} version {version}" if version else name
            raise NotFound(label, kind="dataset")
        return found

    async def items(
        self, org: str, name: str, version: int, *, page_size: int, page_token: str
    ) -> tuple[DatasetVersion, list[DataRecord], str]:
        """One page of a version's frozen items, in id order."""
        dataset = await self.get(org, name, version)
        size = _page_size(page_size)
        after = _decode_token(page_token, f"items:{dataset.id}")
        after_id = str(after[0]) if after else ""

        def work() -> list[DataRecord]:
            with self._engine.connect() as connection:
                return _frozen(connection, dataset.id, after_id, size + 1)

        records = await self._catalog.run(work)
        token = ""
        if len(records) > size:
            records = records[:size]
            token = _encode_token(f"items:{dataset.id}", [records[-1].id])
        return dataset, records, token

    async def diff(
        self,
        org: str,
        name: str,
        from_version: int,
        to_version: int,
        *,
        page_size: int,
        page_token: str,
    ) -> tuple[list[DiffEntry], str]:
        """Items added, removed and changed from one version to another, in id order."""
        if from_version < 1:
            raise invalid_field("from_version", "must be a version number (1 or more)")
        older = await self.get(org, name, from_version)
        newer = await self.get(org, name, to_version)
        size = _page_size(page_size)
        scope = f"diff:{older.id}:{newer.id}"
        after = _decode_token(page_token, scope)
        after_id = str(after[0]) if after else ""

        def work() -> list[DiffEntry]:
            with self._engine.connect() as connection:
                entries = []
                for entry in _differences(connection, older.id, newer.id, after_id):
                    entries.append(entry)
                    if len(entries) > size:
                        break
                return entries

        entries = await self._catalog.run(work)
        token = ""
        if len(entries) > size:
            entries = entries[:size]
            token = _encode_token(scope, [entries[-1].data_id])
        return entries, token

    async def download(
        self, org: str, name: str, version: int, data_id: str, *, offset: int = 0
    ) -> Download:
        """A frozen item's bytes; they exist while the version does, deleted item or not."""
        if not data_id:
            raise invalid_field("data_id", "must not be empty")
        dataset = await self.get(org, name, version)

        def work() -> list[DataRecord]:
            with self._engine.connect() as connection:
                return _frozen(connection, dataset.id, "", 1, only=data_id)

        found = await self._catalog.run(work)
        if not found:
            raise NotFound(data_id)
        record = found[0]
        if not 0 <= offset <= record.size:
            raise invalid_field("read_offset", f"must be within [0, {record.size}], got {offset}")
        if importing.is_reference(record.blob_key):
            # An item registered in place: its object, as long as it has not changed.
            stream = await importing.open_stream(
                self._bucket_reader(), record.blob_key, offset, self._download_chunk_size
            )
            return Download(record, stream)
        chunks = self._blobs.read(
            record.blob_key, offset=offset, chunk_size=self._download_chunk_size
        )
        return Download(record, chunks)


def _frozen(
    connection: Connection, dataset_id: str, after_id: str, limit: int, *, only: str = ""
) -> list[DataRecord]:
    items = dataset_items_table.c
    statement = select(dataset_items_table).where(items.dataset_id == dataset_id)
    if only:
        statement = statement.where(items.id == only)
    if after_id:
        statement = statement.where(items.id > after_id)
    rows = list(connection.execute(statement.order_by(items.id).limit(limit)).mappings())
    tags: dict[str, list[str]] = {row["id"]: [] for row in rows}
    if rows:
        tag_columns = dataset_item_tags_table.c
        for data_id, tag in connection.execute(
            select(tag_columns.data_id, tag_columns.tag)
            .where(tag_columns.dataset_id == dataset_id, tag_columns.data_id.in_(list(tags)))
            .order_by(tag_columns.data_id, tag_columns.tag)
        ):
            tags[data_id].append(tag)
    labels: dict[str, dict[str, str]] = {}
    if rows:
        label_columns = dataset_item_labels_table.c
        for data_id, key, value in connection.execute(
            select(label_columns.data_id, label_columns.key, label_columns.value)
            .where(label_columns.dataset_id == dataset_id, label_columns.data_id.in_(list(tags)))
            .order_by(label_columns.data_id, label_columns.key)
        ):
            labels.setdefault(data_id, {})[key] = value
    return [_row_to_record(row, tuple(tags[row["id"]]), labels.get(row["id"])) for row in rows]


def _walk(connection: Connection, dataset_id: str, after_id: str) -> Iterator[DataRecord]:
    """Every frozen item of a version after `after_id`, in id order, read in batches."""
    while True:
        batch = _frozen(connection, dataset_id, after_id, _DIFF_BATCH)
        yield from batch
        if len(batch) < _DIFF_BATCH:
            return
        after_id = batch[-1].id


def _differences(
    connection: Connection, older_id: str, newer_id: str, after_id: str
) -> Iterator[DiffEntry]:
    """A merge of two id-ordered walks."""
    olds, news = _walk(connection, older_id, after_id), _walk(connection, newer_id, after_id)
    old, new = next(olds, None), next(news, None)
    while old is not None or new is not None:
        if new is None or (old is not None and old.id < new.id):
            assert old is not None
            yield DiffEntry(Change.REMOVED, old.id, old, None)
            old = next(olds, None)
        elif old is None or new.id < old.id:
            yield DiffEntry(Change.ADDED, new.id, None, new)
            new = next(news, None)
        else:
            if old != new:
                yield DiffEntry(Change.CHANGED, old.id, old, new)
            old, new = next(olds, None), next(news, None)


def _version(row: Any) -> DatasetVersion:
    return DatasetVersion(
        id=row["dataset_id"],
        org=row["org"],
        name=row["name"],
        version=int(row["version"]),
        filter=row["filter"],
        description=row["description"],
        created_at=_from_micros(row["created_at"]),
        item_count=int(row["item_count"]),
        total_size=int(row["total_size"]),
    )


def _name_violations(name: str) -> list[FieldViolation]:
    if NAME.match(name):
        return []
    return [
        FieldViolation(
            "name", "must be 1 to 128 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    ]


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise invalid_field("page_size", "must not be negative")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode_token(scope: str, after: list[Any]) -> str:
    payload = json.dumps({"q": scope, "after": after}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> list[Any] | None:
    if not token:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, issued_for = payload["after"], payload["q"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise invalid_field("page_token", "is not a token this service issued") from None
    if issued_for != scope or not isinstance(after, list):
        raise invalid_field("page_token", "was issued for another request; start from page one")
    return after
