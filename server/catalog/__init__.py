"""The catalog: one row per data item, its metadata in typed, indexed columns.

`SqlCatalog` runs on any engine SQLAlchemy speaks; SQLite is the embedded default. Calls are
synchronous SQLAlchemy Core run in worker threads, so the event loop never waits on the database.

One module per concern, each with a small Protocol (what callers need) and its SQL implementation:

- items.py: `ItemCatalog`, items stored (concurrent adds committed together), read, listed,
  updated, deleted; `DuplicateRequestError`, `Page`.
- organizations.py: `OrganizationCatalog`, an organization's usage and limits.
- uploads.py: `UploadCatalog`, resumable uploads (`UploadRecord`).
- tokens.py: `TokenCatalog`, API tokens (`TokenRecord`).
- events.py: `EventLog`, the change log (`Event`, `EventType`).
- thumbnails.py: `ThumbnailCatalog`, previews (`ThumbnailRecord`).
- facets.py: `FacetCatalog`, distinct values of indexed fields, tags and labels.
- locks.py: `BlobHolds`, exclusive use of a blob key across servers.
- labels.py: `LabelChange`, and how items' and events' labels are written and read.
- records.py: `DataRecord`, and an item's record to and from its row.
- database.py: `SqlDatabase`, the engine, connections, SQLite's configuration and writer lock.

`Catalog` is all of them, for the datalake; `SqlCatalog` implements it on one engine. The tables
are declared in server/schema.py, their migrations in server/migrations/.
"""

from __future__ import annotations

from typing import Protocol

from metalake.server.catalog.database import SqlDatabase
from metalake.server.catalog.events import Event, EventLog, EventType, SqlEventLog
from metalake.server.catalog.facets import FACET_FIELDS, FacetCatalog, SqlFacetCatalog
from metalake.server.catalog.items import (
    AddComing,
    DuplicateRequestError,
    ItemCatalog,
    Page,
    SqlItemCatalog,
)
from metalake.server.catalog.labels import LabelChange, _labels_of
from metalake.server.catalog.locks import BlobHolds, SqlBlobHolds
from metalake.server.catalog.organizations import (
    Organization,
    OrganizationCatalog,
    SqlOrganizationCatalog,
)
from metalake.server.catalog.records import (
    DataRecord,
    _from_micros,
    _record_to_row,
    _row_to_record,
    _to_micros,
    new_item_id,
)
from metalake.server.catalog.thumbnails import (
    SqlThumbnailCatalog,
    ThumbnailCatalog,
    ThumbnailRecord,
)
from metalake.server.catalog.tokens import SqlTokenCatalog, TokenCatalog, TokenRecord
from metalake.server.catalog.uploads import SqlUploadCatalog, UploadCatalog, UploadRecord

__all__ = [
    "FACET_FIELDS",
    "AddComing",
    "BlobHolds",
    "Catalog",
    "DataRecord",
    "DuplicateRequestError",
    "Event",
    "EventLog",
    "EventType",
    "FacetCatalog",
    "ItemCatalog",
    "LabelChange",
    "Organization",
    "OrganizationCatalog",
    "Page",
    "SqlBlobHolds",
    "SqlCatalog",
    "SqlDatabase",
    "SqlEventLog",
    "SqlFacetCatalog",
    "SqlItemCatalog",
    "SqlOrganizationCatalog",
    "SqlThumbnailCatalog",
    "SqlTokenCatalog",
    "SqlUploadCatalog",
    "ThumbnailCatalog",
    "ThumbnailRecord",
    "TokenCatalog",
    "TokenRecord",
    "UploadCatalog",
    "UploadRecord",
    # Row conversions, for modules that keep tables of their own in the catalog's database
    # (datasets, similarity, webhooks).
    "_from_micros",
    "_labels_of",
    "_record_to_row",
    "_row_to_record",
    "_to_micros",
    "new_item_id",
]


class Catalog(
    ItemCatalog,
    OrganizationCatalog,
    UploadCatalog,
    TokenCatalog,
    EventLog,
    ThumbnailCatalog,
    FacetCatalog,
    BlobHolds,
    Protocol,
):
    """What the datalake needs from a catalog, whatever engine holds it: every concern."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class SqlCatalog(
    SqlItemCatalog,
    SqlThumbnailCatalog,
    SqlOrganizationCatalog,
    SqlEventLog,
    SqlFacetCatalog,
    SqlUploadCatalog,
    SqlTokenCatalog,
    SqlBlobHolds,
):
    """A catalog on a SQLAlchemy engine: every concern's SQL implementation on one engine,
    sharing its connections and, on SQLite, its writer lock."""
