"""The catalog's tables, one definition for every SQL engine the catalog runs on.

The tables are created and changed only by the migrations in server/migrations; a test checks that
they produce exactly these definitions. Times are stored as integer microseconds since the Unix
epoch (UTC): they sort, compare and index the same way on SQLite and PostgreSQL. acquired_at keeps
the offset the device recorded beside the instant; a naive acquired_at (no offset known) is stored
as if its wall time were UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from metalake.metadata import FLOAT_FIELDS, STRING_FIELDS

metadata_obj = MetaData()

data_table = Table(
    "data",
    metadata_obj,
    Column("id", String(36), primary_key=True),
    # The organization the item belongs to; every query is scoped to one.
    Column("org", String(64), nullable=False),
    Column("filename", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("content_type", Text, nullable=False),
    Column("blob_key", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    # JSON object: metadata field -> "client" or extractor name.
    Column("metadata_sources", Text, nullable=False),
    # Bumped by every change; the etag (AIP-154) is derived from it.
    Column("revision", BigInteger, nullable=False),
    # The client's AIP-155 request id: a retried upload finds the item its first try stored.
    Column("request_id", Text, nullable=True),
    *(Column(name, Double, nullable=True) for name in sorted(FLOAT_FIELDS)),
    Column("acquired_at", BigInteger, nullable=True),
    Column("acquired_at_offset", Integer, nullable=True),  # seconds east of UTC; NULL: unknown
    *(Column(name, Text, nullable=True) for name in sorted(STRING_FIELDS)),
    # The indexes behind the filters users run most: time ranges, bounding boxes, equality on
    # identifiers. Every one starts with org, as every query does; equality indexes go on with
    # created_at, id (the default order), so a page is read in order from the index, no sort.
    Index("ix_data_created_at", "org", "created_at", "id"),
    Index("ix_data_acquired_at", "org", "acquired_at", "id"),
    Index("ix_data_latitude_longitude", "org", "latitude", "longitude"),
    Index("ix_data_manufacturer", "org", "manufacturer", "created_at", "id"),
    Index("ix_data_reference", "org", "reference", "created_at", "id"),
    Index("ix_data_custom_id", "org", "custom_id", "created_at", "id"),
    Index("ix_data_blob_key", "blob_key"),
    Index("ix_data_request_id", "org", "request_id", unique=True),
)

# Resumable uploads in progress (and, until they expire, finished ones, so that a client that
# lost the final answer can still learn its Data).
uploads_table = Table(
    "uploads",
    metadata_obj,
    Column("org", String(64), primary_key=True),
    Column("id", String(128), primary_key=True),
    # Names the upload's staging file: ids are the client's and unique only within an org.
    Column("staging_key", String(32), nullable=False, unique=True),
    Column("header", Text, nullable=False),  # JSON of the UploadDataHeader
    Column("committed_size", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("data_id", String(36), nullable=True),
    Index("ix_uploads_expires_at", "expires_at"),
)

data_tags_table = Table(
    "data_tags",
    metadata_obj,
    Column("data_id", String(36), ForeignKey("data.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", Text, primary_key=True),
    # The item's org, copied here (an item never changes org) so that the distinct tags of one
    # organization are an index walk over (org, tag): one seek per tag (the console's facets).
    Column("org", String(64), nullable=False),
    Index("ix_data_tags_tag", "tag", "data_id"),
    Index("ix_data_tags_org_tag", "org", "tag"),
)

# Previews of items (server/thumbnails.py), made on first request and kept: one row per item and
# size. blob_key names a blob in the same store as the items' (the SHA-256 of the preview's bytes);
# NULL records that the item's content cannot be previewed, so that nobody tries again. Their
# bytes count in the organization's usage, and they go with their item.
thumbnails_table = Table(
    "thumbnails",
    metadata_obj,
    Column("data_id", String(36), ForeignKey("data.id", ondelete="CASCADE"), primary_key=True),
    Column("size", Integer, primary_key=True),
    Column("org", String(64), nullable=False),
    # The item's content: items with identical content share their previews' blobs.
    Column("source_sha256", String(64), nullable=False),
    Column("blob_key", Text, nullable=True),
    Column("bytes", BigInteger, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_thumbnails_source", "source_sha256", "size"),
    Index("ix_thumbnails_blob_key", "blob_key"),
)

# Labels (free key/value pairs) of each item. The item's org and created_at are copied here (an
# item's created_at never changes) so that (org, key, value, created_at, data_id) yields the
# items with `labels.k = "v"` already in ListData's default order: a page costs the same however
# many or few items have the label. The primary key answers a label per item and loads an
# item's labels.
data_labels_table = Table(
    "data_labels",
    metadata_obj,
    Column("data_id", String(36), ForeignKey("data.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", Text, nullable=False),
    Column("org", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_data_labels_key_value", "org", "key", "value", "created_at", "data_id"),
    # The same for `labels.k:*`, whatever the value.
    Index("ix_data_labels_key", "org", "key", "created_at", "data_id"),
)

# API tokens: only a hash of each is kept. The token's id is public (listing, revoking).
tokens_table = Table(
    "tokens",
    metadata_obj,
    Column("id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("org", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("description", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

# Per organization: bytes its items use (kept in step with data, in the same transactions) and
# its own limits; NULL limits fall back to the server's settings.
organizations_table = Table(
    "organizations",
    metadata_obj,
    Column("org", String(64), primary_key=True),
    Column("used_bytes", BigInteger, nullable=False),
    Column("max_file_size", BigInteger, nullable=True),
    Column("storage_quota", BigInteger, nullable=True),
)

# The change log behind WatchData: one row per item created, updated or deleted, with a full
# snapshot of the item after the change (before it, for deletions), so that a watcher's filter
# applies to what the item was then. seq orders events; it never goes backwards or repeats.
events_table = Table(
    "events",
    metadata_obj,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("event_type", Integer, nullable=False),
    Column("event_time", BigInteger, nullable=False),
    *(Column(c.name, c.type, nullable=c.nullable) for c in data_table.columns),
    Index("ix_events_org_seq", "org", "seq"),
    Index("ix_events_event_time", "event_time"),
    sqlite_autoincrement=True,
)

event_tags_table = Table(
    "event_tags",
    metadata_obj,
    Column("seq", BigInteger, ForeignKey("events.seq", ondelete="CASCADE"), primary_key=True),
    Column("tag", Text, primary_key=True),
)

# The labels of each event's snapshot, as event_tags are its tags.
event_labels_table = Table(
    "event_labels",
    metadata_obj,
    Column("seq", BigInteger, ForeignKey("events.seq", ondelete="CASCADE"), primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", Text, nullable=False),
)

# Events up to `pruned_through` were deleted: a watcher resuming from before it missed some.
event_log_table = Table(
    "event_log",
    metadata_obj,
    Column("id", Integer, primary_key=True),
    Column("pruned_through", BigInteger, nullable=False),
)

# Dataset snapshots: each version of a named dataset is immutable. Its items are frozen copies of
# the data rows (same columns), their tags and their labels as they were when the version was
# created; a blob a frozen item names is kept while the version exists, even after the item is
# deleted.
dataset_versions_table = Table(
    "dataset_versions",
    metadata_obj,
    Column("dataset_id", String(36), primary_key=True),
    Column("org", String(64), nullable=False),
    Column("name", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("filter", Text, nullable=False),
    Column("description", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("item_count", BigInteger, nullable=False),
    Column("total_size", BigInteger, nullable=False),
    Index("ix_dataset_versions_name", "org", "name", "version", unique=True),
)

dataset_items_table = Table(
    "dataset_items",
    metadata_obj,
    Column(
        "dataset_id",
        String(36),
        ForeignKey("dataset_versions.dataset_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    *(
        Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
        for c in data_table.columns
    ),
    Index("ix_dataset_items_blob_key", "blob_key"),
)

dataset_item_tags_table = Table(
    "dataset_item_tags",
    metadata_obj,
    Column("dataset_id", String(36), primary_key=True),
    Column("data_id", String(36), primary_key=True),
    Column("tag", Text, primary_key=True),
    ForeignKeyConstraint(
        ["dataset_id", "data_id"],
        ["dataset_items.dataset_id", "dataset_items.id"],
        ondelete="CASCADE",
    ),
)

# The labels of frozen items, as dataset_item_tags holds their tags.
dataset_item_labels_table = Table(
    "dataset_item_labels",
    metadata_obj,
    Column("dataset_id", String(36), primary_key=True),
    Column("data_id", String(36), primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", Text, nullable=False),
    ForeignKeyConstraint(
        ["dataset_id", "data_id"],
        ["dataset_items.dataset_id", "dataset_items.id"],
        ondelete="CASCADE",
    ),
)

# Near-duplicate search: each image's 64-bit dHash (and its mirror image's), stored as signed
# BIGINTs, and the hash's three bands (21, 21 and 22 bits), each indexed: a Hamming query looks
# up band values (multi-index hashing, see server/similarity.py). A row with a NULL dhash
# records an item that is not a decodable image, so that it is not tried again.
image_hashes_table = Table(
    "image_hashes",
    metadata_obj,
    Column("data_id", String(36), ForeignKey("data.id", ondelete="CASCADE"), primary_key=True),
    Column("org", String(64), nullable=False),
    Column("dhash", BigInteger, nullable=True),
    Column("mirror", BigInteger, nullable=True),
    *(Column(f"band{i}", Integer, nullable=True) for i in range(3)),
    # Covering: a query reads candidates' hashes from the index alone, no table lookups.
    *(Index(f"ix_image_hashes_band{i}", "org", f"band{i}", "dhash", "data_id") for i in range(3)),
)

# Webhooks: endpoints an organization registered (the secret is kept: every POST is signed with
# it), each with its place in the change log, and the delivery log: one row per event and
# webhook, with the exact body sent, its attempts, and a lease while a server is sending it.
webhooks_table = Table(
    "webhooks",
    metadata_obj,
    Column("id", String(32), primary_key=True),
    Column("org", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", Text, nullable=False),  # comma-separated EventType numbers
    Column("filter", Text, nullable=False),
    Column("secret", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("after_seq", BigInteger, nullable=False),  # events up to here are fanned out
    Index("ix_webhooks_org", "org", "created_at"),
)

webhook_deliveries_table = Table(
    "webhook_deliveries",
    metadata_obj,
    Column("id", String(80), primary_key=True),  # the webhook-id header: same on every attempt
    Column(
        "webhook_id",
        String(32),
        ForeignKey("webhooks.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("org", String(64), nullable=False),
    Column("event_seq", BigInteger, nullable=True),  # NULL: a test event
    Column("data_id", String(36), nullable=True),
    Column("event_type", String(32), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("last_attempt_at", BigInteger, nullable=True),
    Column("response_status", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("lease_token", String(32), nullable=True),
    Column("lease_until", BigInteger, nullable=True),
    Index("ix_webhook_deliveries_event", "webhook_id", "event_seq", unique=True),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_item", "webhook_id", "data_id", "event_seq"),
    Index("ix_webhook_deliveries_log", "webhook_id", "created_at", "id"),
)
