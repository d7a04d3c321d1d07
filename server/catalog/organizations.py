"""Organizations: the bytes each one stores, and its own limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from metalake.server.catalog.database import SqlDatabase
from metalake.server.schema import organizations_table


@dataclass(frozen=True)
class Organization:
    """An organization's usage and its own limits (None: the server's defaults apply)."""

    org: str
    used_bytes: int = 0
    max_file_size: int | None = None
    storage_quota: int | None = None


class OrganizationCatalog(Protocol):
    """An organization's usage and limits."""

    async def organization(self, org: str) -> Organization: ...

    async def set_organization_limits(
        self, org: str, *, max_file_size: int | None, storage_quota: int | None
    ) -> None: ...


class SqlOrganizationCatalog(SqlDatabase):
    """Organizations on the catalog's database; items and previews count their bytes here."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # Organizations known to exist (see _ensure_organization).
        self._known_organizations: set[str] = set()

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
