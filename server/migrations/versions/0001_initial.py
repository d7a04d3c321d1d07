"""The first catalog schema: items with typed metadata and tags, resumable uploads, API tokens,
organizations and the change log behind WatchData.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_FLOATS = ("altitude", "latitude", "longitude", "resolution_x", "resolution_y")
_STRINGS = (
    "acquired_by",
    "color_space",
    "compression",
    "custom_id",
    "manufacturer",
    "reference",
    "resolution_unit",
    "software",
    "weather",
)


def _data_columns(*, primary: bool = False) -> list[sa.Column[Any]]:
    """The columns of an item; events keep snapshots with the same ones."""
    return [
        sa.Column("id", sa.String(36), primary_key=primary, nullable=False),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("blob_key", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("metadata_sources", sa.Text, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.Text, nullable=True),
        *(sa.Column(name, sa.Double, nullable=True) for name in _FLOATS),
        sa.Column("acquired_at", sa.BigInteger, nullable=True),
        sa.Column("acquired_at_offset", sa.Integer, nullable=True),
        *(sa.Column(name, sa.Text, nullable=True) for name in _STRINGS),
    ]


def upgrade() -> None:
    op.create_table("data", *_data_columns(primary=True))
    op.create_index("ix_data_created_at", "data", ["org", "created_at", "id"])
    op.create_index("ix_data_acquired_at", "data", ["org", "acquired_at", "id"])
    op.create_index("ix_data_latitude_longitude", "data", ["org", "latitude", "longitude"])
    op.create_index("ix_data_manufacturer", "data", ["org", "manufacturer", "created_at", "id"])
    op.create_index("ix_data_reference", "data", ["org", "reference", "created_at", "id"])
    op.create_index("ix_data_custom_id", "data", ["org", "custom_id", "created_at", "id"])
    op.create_index("ix_data_sha256", "data", ["sha256"])
    op.create_index("ix_data_blob_key", "data", ["blob_key"])
    op.create_index("ix_data_request_id", "data", ["org", "request_id"], unique=True)
    op.create_table(
        "data_tags",
        sa.Column(
            "data_id",
            sa.String(36),
            sa.ForeignKey("data.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("tag", sa.Text, primary_key=True),
    )
    op.create_index("ix_data_tags_tag", "data_tags", ["tag", "data_id"])
    op.create_table(
        "uploads",
        sa.Column("org", sa.String(64), primary_key=True),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("staging_key", sa.String(32), nullable=False, unique=True),
        sa.Column("header", sa.Text, nullable=False),
        sa.Column("committed_size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("data_id", sa.String(36), nullable=True),
    )
    op.create_index("ix_uploads_expires_at", "uploads", ["expires_at"])
    op.create_table(
        "organizations",
        sa.Column("org", sa.String(64), primary_key=True),
        sa.Column("used_bytes", sa.BigInteger, nullable=False),
        sa.Column("max_file_size", sa.BigInteger, nullable=True),
        sa.Column("storage_quota", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
    )

    op.create_table(
        "events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("event_type", sa.Integer, nullable=False),
        sa.Column("event_time", sa.BigInteger, nullable=False),
        *_data_columns(),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_org_seq", "events", ["org", "seq"])
    op.create_index("ix_events_event_time", "events", ["event_time"])
    op.create_table(
        "event_tags",
        sa.Column(
            "seq",
            sa.BigInteger,
            sa.ForeignKey("events.seq", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("tag", sa.Text, primary_key=True),
    )
    op.create_table(
        "event_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pruned_through", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("event_log")
    op.drop_table("event_tags")
    op.drop_table("events")
    op.drop_table("tokens")
    op.drop_table("organizations")
    op.drop_table("uploads")
    op.drop_table("data_tags")
    op.drop_table("data")
