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
