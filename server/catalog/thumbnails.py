"""Previews of items (made by server/thumbnails.py), counted in their organization's usage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import RowMapping, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from metalake.server.catalog.organizations import SqlOrganizationCatalog
from metalake.server.catalog.records import _from_micros, _item, _to_micros
from metalake.server.errors import NotFound
from metalake.server.schema import data_table, organizations_table, thumbnails_table


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


class ThumbnailCatalog(Protocol):
    """The previews recorded, per item and per content."""

    async def thumbnail(self, org: str, data_id: str, size: int) -> ThumbnailRecord | None: ...

    async def shared_thumbnail(self, source_sha256: str, size: int) -> ThumbnailRecord | None: ...

    async def add_thumbnail(self, record: ThumbnailRecord) -> ThumbnailRecord: ...

    async def thumbnail_keys(self, org: str, data_id: str) -> list[str]: ...


class SqlThumbnailCatalog(SqlOrganizationCatalog):
    """Previews on the catalog's database, counted in their organization's usage."""

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

    async def thumbnail_keys(self, org: str, data_id: str) -> list[str]:
        t = thumbnails_table.c
        statement = select(t.blob_key).where(
            t.data_id == data_id, t.org == org, t.blob_key.is_not(None)
        )

        def work() -> list[str]:
            with self._engine.connect() as connection:
                return [key for (key,) in connection.execute(statement)]

        return await self._run(work)


def _thumbnail_from_row(row: RowMapping) -> ThumbnailRecord:
    return ThumbnailRecord(**{**row, "created_at": _from_micros(row["created_at"])})
