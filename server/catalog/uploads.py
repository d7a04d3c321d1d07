"""Resumable uploads: their headers and how much of each is durable."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import RowMapping, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from metalake.server.catalog.database import SqlDatabase
from metalake.server.catalog.records import _from_micros, _to_micros
from metalake.server.schema import uploads_table


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


class UploadCatalog(Protocol):
    """Resumable uploads in progress, finished (by an item) or expired."""

    async def start_upload(self, upload: UploadRecord) -> UploadRecord: ...

    async def get_upload(self, org: str, upload_id: str) -> UploadRecord | None: ...

    async def set_upload_committed(self, upload: UploadRecord, committed_size: int) -> None: ...

    async def expired_uploads(self, now: datetime) -> list[UploadRecord]: ...

    async def staging_keys_in_use(self, keys: Collection[str]) -> set[str]: ...

    async def delete_upload(self, upload: UploadRecord) -> None: ...


class SqlUploadCatalog(SqlDatabase):
    """Resumable uploads on the catalog's database."""

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
