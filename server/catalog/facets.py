"""Facets: the distinct values of an indexed field, tags and labels, per organization."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import text
from sqlalchemy.sql.elements import TextClause

from metalake.server.catalog.database import SqlDatabase


class FacetCatalog(Protocol):
    """Distinct values, read from the indexes."""

    async def distinct_values(self, org: str, field: str, limit: int) -> list[str]: ...


class SqlFacetCatalog(SqlDatabase):
    """Facets read from the catalog's indexes."""

    async def distinct_values(self, org: str, field: str, limit: int) -> list[str]:
        """The first `limit` distinct values of an indexed text field, in order.

        A loose index scan (one index seek per value, a recursive query both engines run), so
        that it costs the number of values, not the number of items.
        """
        params: dict[str, object] = {"org": org, "limit": limit}
        if field == "tags":
            statement = _DISTINCT_TAGS
        elif field == "labels":
            statement = _DISTINCT_LABEL_KEYS
        elif field.startswith("labels."):
            statement = _DISTINCT_LABEL_VALUES
            params["key"] = field.removeprefix("labels.")
        elif field in FACET_FIELDS:
            statement = _DISTINCT_FIELDS[field]
        else:
            raise ValueError(f"{field} has no index to read distinct values from")

        def work() -> list[str]:
            with self._engine.connect() as connection:
                rows = connection.execute(statement, params)
                return [value for (value,) in rows]

        return await self._run(work)


def _loose_index_scan(column: str, table: str, scope: str) -> TextClause:
    """The distinct values of `column` among the rows of `table` that `scope` selects, in order,
    at most :limit of them: one index seek per value, on an index led by the scope's columns
    and then `column`. Every argument is one of this module's constants, never user text."""
    return text(
        f"""
        WITH RECURSIVE found(value, n) AS (
            SELECT (SELECT MIN({column}) FROM {table} WHERE {scope}), 1
            UNION ALL
            SELECT (SELECT MIN({column}) FROM {table} WHERE {scope} AND {column} > found.value),
                   n + 1
            FROM found WHERE found.value IS NOT NULL AND n < :limit
        )
        SELECT value FROM found WHERE value IS NOT NULL
        """
    )


# Text fields with an index led by (org, field): their distinct values are cheap to list.
FACET_FIELDS = frozenset({"manufacturer", "reference", "custom_id"})

# Each walks an index: (org, field) of data; data_tags' (org, tag); data_labels' (org, key, ...)
# for the keys and (org, key, value, ...) for the values of one key.
_DISTINCT_FIELDS = {
    field: _loose_index_scan(field, "data", "org = :org") for field in sorted(FACET_FIELDS)
}
_DISTINCT_TAGS = _loose_index_scan("tag", "data_tags", "org = :org")
_DISTINCT_LABEL_KEYS = _loose_index_scan("key", "data_labels", "org = :org")
_DISTINCT_LABEL_VALUES = _loose_index_scan("value", "data_labels", "org = :org AND key = :key")
