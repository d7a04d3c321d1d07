"""Labels of items and of events: how a change applies to them, writing and reading them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Connection, RowMapping, Table, delete, func, insert, select

from metalake.labels import MAX_LABELS
from metalake.server.errors import invalid_field
from metalake.server.schema import data_labels_table


@dataclass(frozen=True)
class LabelChange:
    """What an update does to an item's labels: with `replace`, the labels become `set`;
    otherwise the keys in `set` are set and those in `remove` removed, the others kept."""

    set: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()
    replace: bool = False


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
