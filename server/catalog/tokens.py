"""API tokens, stored as their SHA-256 only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from metalake.server.catalog.database import SqlDatabase
from metalake.server.catalog.records import _from_micros, _to_micros
from metalake.server.schema import tokens_table


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


class TokenCatalog(Protocol):
    """The API tokens: what server/auth.py needs."""

    async def add_token(self, token: TokenRecord) -> None: ...

    async def find_token(self, token_hash: str) -> TokenRecord | None: ...

    async def list_tokens(self) -> list[TokenRecord]: ...

    async def revoke_token(self, token_id: str, at: datetime) -> bool: ...

    async def has_active_tokens(self) -> bool: ...


class SqlTokenCatalog(SqlDatabase):
    """API tokens on the catalog's database."""

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
