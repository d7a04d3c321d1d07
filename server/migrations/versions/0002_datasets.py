"""Dataset snapshots: immutable versions of a named selection of items, with frozen copies of
the items (and their tags) as they were when the version was created.

Revision ID: 0002_datasets
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002_datasets"
down_revision = "0001"
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


def _item_columns() -> list[sa.Column[Any]]:
    """The columns of an item (as in 0001's data table), frozen in a version."""
    return [
        sa.Column("id", sa.String(36), primary_key=True, nullable=False),
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
    op.create_table(
        "dataset_versions",
        sa.Column("dataset_id", sa.String(36), primary_key=True),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("filter", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("item_count", sa.BigInteger, nullable=False),
        sa.Column("total_size", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_dataset_versions_name", "dataset_versions", ["org", "name", "version"], unique=True
    )
    op.create_table(
        "dataset_items",
        sa.Column(
            "dataset_id",
            sa.String(36),
            sa.ForeignKey("dataset_versions.dataset_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        *_item_columns(),
    )
    op.create_index("ix_dataset_items_blob_key", "dataset_items", ["blob_key"])
    op.create_table(
        "dataset_item_tags",
        sa.Column("dataset_id", sa.String(36), primary_key=True),
        sa.Column("data_id", sa.String(36), primary_key=True),
        sa.Column("tag", sa.Text, primary_key=True),
        sa.ForeignKeyConstraint(
            ["dataset_id", "data_id"],
            ["dataset_items.dataset_id", "dataset_items.id"],
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("dataset_item_tags")
    op.drop_table("dataset_items")
    op.drop_index("ix_dataset_versions_name", "dataset_versions")
    op.drop_table("dataset_versions")
