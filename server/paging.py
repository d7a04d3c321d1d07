"""ListData's pages: a parsed filter and order, and keyset page tokens.

A page token carries the sort key of the last row shown, so the next page starts strictly after
it: items stored meanwhile never shift later pages, and page 1,000 costs what page 1 does (no
OFFSET). A token is bound to its filter and order_by by a fingerprint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import RowMapping, and_, false, or_, tuple_
from sqlalchemy.sql.elements import ColumnElement

from metalake.server.errors import invalid_field
from metalake.server.filtering import FilterError, OrderKey, compile_filter, parse_order_by
from metalake.server.schema import data_table

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


_NOT_NULL_COLUMNS = frozenset(
    {"id", "filename", "size", "content_type", "created_at", "updated_at"}
)


@dataclass(frozen=True)
class ListQuery:
    filter: str
    order: list[OrderKey]
    page_size: int
    where: ColumnElement[bool] | None
    cursor: list[Any] | None

    @classmethod
    def parse(cls, filter: str, order_by: str, page_size: int, page_token: str) -> ListQuery:
        if page_size < 0:
            raise invalid_field("page_size", "must not be negative")
        page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            where = compile_filter(filter)
        except FilterError as error:
            raise invalid_field("filter", str(error), position=error.position) from None
        try:
            order = parse_order_by(order_by) or [OrderKey("created_at", False)]
        except FilterError as error:
            raise invalid_field("order_by", str(error)) from None
        # The id breaks ties, so every row has exactly one place in the order.
        order = [*order, OrderKey("id", False)]
        query = cls(filter, order, page_size, where, None)
        if page_token:
            return cls(filter, order, page_size, where, query._decode(page_token))
        return query

    def _fingerprint(self) -> str:
        spec = json.dumps([self.filter, [(k.field, k.descending) for k in self.order]])
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    def token_after(self, row: RowMapping) -> str:
        values = [row[key.field] for key in self.order]
        payload = json.dumps({"q": self._fingerprint(), "after": values}, separators=(",", ":"))
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")

    def _decode(self, token: str) -> list[Any]:
        try:
            payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            values = payload["after"]
            fingerprint = payload["q"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise invalid_field("page_token", "is not a token this service issued") from None
        if fingerprint != self._fingerprint() or len(values) != len(self.order):
            raise invalid_field(
                "page_token", "was issued for another filter or order_by; start from page one"
            )
        return list(values)

    def order_clauses(self) -> list[Any]:
        clauses = []
        for key in self.order:
            column = data_table.c[key.field]
            clause = column.desc() if key.descending else column.asc()
            clauses.append(clause if key.field in _NOT_NULL_COLUMNS else clause.nulls_last())
        return clauses

    def after(self) -> ColumnElement[bool] | None:
        """Rows strictly after the cursor in this order (absent values sort last)."""
        if self.cursor is None:
            return None
        keys = list(zip(self.order, self.cursor, strict=True))
        if all(k.field in _NOT_NULL_COLUMNS and not k.descending for k, _ in keys):
            # One row comparison: an index range scan on (created_at, id) and the like.
            columns = [data_table.c[k.field] for k, _ in keys]
            return tuple_(*columns) > tuple_(*[v for _, v in keys])
        alternatives = []
        for i, (key, value) in enumerate(keys):
            column = data_table.c[key.field]
            if value is None:
                continue  # nothing sorts after an absent value but other absent values
            beyond = column < value if key.descending else column > value
            if key.field not in _NOT_NULL_COLUMNS:
                beyond = or_(beyond, column.is_(None))
            equal_prefix = [
                data_table.c[k.field].is_(None) if v is None else data_table.c[k.field] == v
                for k, v in keys[:i]
            ]
            alternatives.append(and_(*equal_prefix, beyond))
        return or_(*alternatives) if alternatives else false()
