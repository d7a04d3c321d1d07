"""Exports: one record per item, streamed to CSV, JSON Lines or Parquet.

A record holds id, filename, size, sha256, content_type, created_at, updated_at, every metadata
field (None when absent), acquired_at_utc_offset (seconds east of UTC the device recorded; None
when unknown), tags, labels and, when asked, metadata_sources (who set each field).

Items are read page by page and written as they come (Parquet: a row group every
PARQUET_BATCH rows), so memory stays flat however many items there are. The file is written
beside its final name and renamed into place once complete: an export that fails leaves nothing.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalake import metadata as md

if TYPE_CHECKING:
    from metalake.client import Data

FORMATS = ("csv", "jsonl", "parquet")
PARQUET_BATCH = 10_000
BASE_COLUMNS: tuple[str, ...] = (
    "id",
    "filename",
    "size",
    "sha256",
    "content_type",
    "created_at",
    "updated_at",
    *md.FIELDS,
    "acquired_at_utc_offset",
    "tags",
    "labels",
)


class ExportError(ValueError):
    """An export that cannot be written as asked (format, missing optional dependency)."""


def columns(provenance: bool) -> tuple[str, ...]:
    return (*BASE_COLUMNS, "metadata_sources") if provenance else BASE_COLUMNS


def record(data: Data, *, provenance: bool = False) -> dict[str, Any]:
    """One item as a flat record of Python values (datetimes, floats, str, lists, dicts)."""
    acquired = data.metadata.get("acquired_at")
    offset = acquired.utcoffset() if isinstance(acquired, datetime) else None
    row: dict[str, Any] = {
        "id": data.id,
        "filename": data.filename,
        "size": data.size,
        "sha256": data.sha256,
        "content_type": data.content_type,
        "created_at": data.created_at,
        "updated_at": data.updated_at,
        **{name: data.metadata.get(name) for name in md.FIELDS},
        "acquired_at_utc_offset": int(offset.total_seconds()) if offset is not None else None,
        "tags": list(data.tags),
        "labels": dict(data.labels),
    }
    if provenance:
        row["metadata_sources"] = dict(data.metadata_sources)
    return row


def format_of(path: Path, given: str | None) -> str:
    """The format asked for, or the one the file's suffix names."""
    chosen = given or path.suffix.lower().lstrip(".")
    if chosen not in FORMATS:
        raise ExportError(
            f"cannot tell the format of {path}: give --format {'|'.join(FORMATS)} "
            "(or a .csv, .jsonl or .parquet name)"
        )
    return chosen


def write(records: Iterable[dict[str, Any]], path: Path, fmt: str, *, provenance: bool) -> int:
    """Stream records into `path` (via a temporary file renamed into place); how many."""
    if fmt == "parquet":
        require_pyarrow()
    partial = path.with_name(f".{path.name}.partial")
    try:
        if fmt == "jsonl":
            count = _write_jsonl(records, partial)
        elif fmt == "csv":
            count = _write_csv(records, partial, columns(provenance))
        else:
            count = _write_parquet(records, partial, provenance)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count


def _text(value: Any) -> Any:
    if isinstance(value, datetime):
        return md.format_datetime(value)
    return value


def _write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in records:
            handle.write(json.dumps({k: _text(v) for k, v in row.items()}, ensure_ascii=False))
            handle.write("\n")
            count += 1
    return count


def _write_csv(records: Iterable[dict[str, Any]], path: Path, names: tuple[str, ...]) -> int:
    """Text cells: tags `;`-separated (as manifests read them); labels and metadata_sources as
    JSON objects; absent values empty."""
    count = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for row in records:
            cells = []
            for name in names:
                value = row[name]
                if value is None:
                    cells.append("")
                elif name == "tags":
                    cells.append(";".join(value))
                elif isinstance(value, dict):
                    cells.append(json.dumps(value, ensure_ascii=False, sort_keys=True))
                else:
                    cells.append(_text(value))
            writer.writerow(cells)
            count += 1
    return count


def require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ExportError("Parquet export needs pyarrow: pip install 'metalake[export]'") from None


def parquet_schema(provenance: bool) -> Any:
    """Typed columns: timestamps in UTC (acquired_at is the instant; its offset is beside it),
    float64 numbers, int64 size, int32 offset seconds, list<string> tags, map labels."""
    import pyarrow as pa

    instant = pa.timestamp("us", tz="UTC")
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("filename", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("content_type", pa.string(), nullable=False),
        pa.field("created_at", instant, nullable=False),
        pa.field("updated_at", instant, nullable=False),
    ]
    for name in md.FIELDS:
        if name in md.FLOAT_FIELDS:
            fields.append(pa.field(name, pa.float64()))
        elif name in md.TIMESTAMP_FIELDS:
            fields.append(pa.field(name, instant))
        else:
            fields.append(pa.field(name, pa.string()))
    fields += [
        pa.field("acquired_at_utc_offset", pa.int32()),
        pa.field("tags", pa.list_(pa.string()), nullable=False),
        pa.field("labels", pa.map_(pa.string(), pa.string()), nullable=False),
    ]
    if provenance:
        fields.append(pa.field("metadata_sources", pa.map_(pa.string(), pa.string())))
    return pa.schema(fields)


def _parquet_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # An offset-less acquired_at is a wall time carried as if it were UTC, as in the catalog.
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, dict):
        return list(value.items())
    return value


def _write_parquet(records: Iterable[dict[str, Any]], path: Path, provenance: bool) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(provenance)
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in _batches(records, PARQUET_BATCH):
            table = pa.Table.from_pylist(
                [{k: _parquet_value(v) for k, v in row.items()} for row in batch], schema=schema
            )
            writer.write_table(table)
            count += len(batch)
    return count


def _batches(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in records:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
