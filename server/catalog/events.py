"""The change log: one event per item created, updated or deleted, in commit order, for
watchers (WatchData), webhooks and the similarity index.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Protocol

from sqlalchemy import Connection, delete, func, insert, select, text, update

from metalake.server.catalog.database import SqlDatabase
from metalake.server.catalog.labels import _insert_labels, _labels_of
from metalake.server.catalog.records import (
    DataRecord,
    _from_micros,
    _record_to_row,
    _row_to_record,
    _to_micros,
)
from metalake.server.errors import invalid_field
from metalake.server.filtering import EVENTS, FilterError, compile_filter
from metalake.server.schema import (
    event_labels_table,
    event_log_table,
    event_tags_table,
    events_table,
)


class EventType(IntEnum):
    """As in the contract's EventType."""

    CREATED = 1
    UPDATED = 2
    DELETED = 3


@dataclass(frozen=True)
class Event:
    """One change of one item: the item after it (before it, for a deletion)."""

    seq: int
    type: EventType
    time: datetime
    record: DataRecord


class EventLog(Protocol):
    """Reading and pruning the change log."""

    async def events_after(self, org: str, seq: int, *, filter: str, limit: int) -> list[Event]: ...

    async def last_event_seq(self) -> int: ...

    async def pruned_through(self) -> int: ...

    async def prune_events(self, before: datetime) -> int: ...


class SqlEventLog(SqlDatabase):
    """The change log; item writes record their events in their own transaction
    (_record_event)."""

    def _record_event(
        self, connection: Connection, event_type: EventType, record: DataRecord, at: datetime
    ) -> None:
        self._lock_event_order(connection)
        row = _record_to_row(record) | {
            "event_type": int(event_type),
            "event_time": _to_micros(at),
        }
        seq = connection.execute(
            insert(events_table).values(row).returning(events_table.c.seq)
        ).scalar_one()
        if record.tags:
            connection.execute(
                insert(event_tags_table), [{"seq": seq, "tag": tag} for tag in record.tags]
            )
        _insert_labels(connection, event_labels_table, {"seq": seq}, record.labels)

    def _lock_event_order(self, connection: Connection) -> None:
        if self._engine.dialect.name == "postgresql":
            # Sequence numbers are handed out at insert but become visible at commit; holding
            # this lock to the commit makes them visible in order, so a watcher that read up
            # to seq N never later finds a smaller one. SQLite serialises writes anyway.
            connection.execute(_LOCK_EVENT_ORDER, {"key": _EVENTS_LOCK})

    async def events_after(self, org: str, seq: int, *, filter: str, limit: int) -> list[Event]:
        """The organization's events after `seq` that match `filter`, oldest first."""
        try:
            condition = compile_filter(filter, EVENTS)
        except FilterError as error:
            raise invalid_field("filter", str(error)) from None
        conditions = [events_table.c.org == org, events_table.c.seq > seq]
        if condition is not None:
            conditions.append(condition)
        statement = (
            select(events_table).where(*conditions).order_by(events_table.c.seq).limit(limit)
        )

        def work() -> list[Event]:
            with self._engine.connect() as connection:
                rows = list(connection.execute(statement).mappings())
                tags: dict[int, list[str]] = {row["seq"]: [] for row in rows}
                if rows:
                    for event_seq, tag in connection.execute(
                        select(event_tags_table.c.seq, event_tags_table.c.tag)
                        .where(event_tags_table.c.seq.in_(list(tags)))
                        .order_by(event_tags_table.c.seq, event_tags_table.c.tag)
                    ):
                        tags[event_seq].append(tag)
                labels = _labels_of(connection, event_labels_table.c.seq, list(tags))
            return [
                Event(
                    seq=row["seq"],
                    type=EventType(row["event_type"]),
                    time=_from_micros(row["event_time"]),
                    record=_row_to_record(row, tuple(tags[row["seq"]]), labels.get(row["seq"])),
                )
                for row in rows
            ]

        return await self._run(work)

    async def last_event_seq(self) -> int:
        statement = select(func.max(events_table.c.seq))
        return int(await self._run(lambda: self._scalar(statement)) or 0)

    async def pruned_through(self) -> int:
        statement = select(event_log_table.c.pruned_through).where(event_log_table.c.id == 1)
        return int(await self._run(lambda: self._scalar(statement)) or 0)

    async def prune_events(self, before: datetime) -> int:
        """Forget events older than `before`; watchers resuming from them will be told."""

        def work() -> int:
            with self._engine.begin() as connection:
                last = connection.execute(
                    select(func.max(events_table.c.seq)).where(
                        events_table.c.event_time < _to_micros(before)
                    )
                ).scalar()
                if last is None:
                    return 0
                connection.execute(delete(event_tags_table).where(event_tags_table.c.seq <= last))
                connection.execute(
                    delete(event_labels_table).where(event_labels_table.c.seq <= last)
                )
                pruned = connection.execute(
                    delete(events_table).where(events_table.c.seq <= last)
                ).rowcount
                # Pruning goes oldest first, so `last` only ever grows.
                updated = connection.execute(
                    update(event_log_table)
                    .where(event_log_table.c.id == 1)
                    .values(pruned_through=last)
                ).rowcount
                if not updated:
                    connection.execute(insert(event_log_table).values(id=1, pruned_through=last))
                return int(pruned)

        return await self._run(work, write=True)


_EVENTS_LOCK = 0x6D6C6B65  # "mlke": the advisory lock that orders event commits
_LOCK_EVENT_ORDER = text("SELECT pg_advisory_xact_lock(:key)")
