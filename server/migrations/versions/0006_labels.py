"""Labels: free key/value pairs of items (data_labels) and of the change log's snapshots
(event_labels).

Revision ID: 0006_labels
Revises: 0005_thumbnails
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_labels"
down_revision = "0005_thumbnails"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "data_labels",
        sa.Column(
            "data_id",
            sa.String(36),
            sa.ForeignKey("data.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_data_labels_key_value",
        "data_labels",
        ["org", "key", "value", "created_at", "data_id"],
    )
    op.create_index("ix_data_labels_key", "data_labels", ["org", "key", "created_at", "data_id"])
    op.create_table(
        "event_labels",
        sa.Column(
            "seq",
            sa.BigInteger,
            sa.ForeignKey("events.seq", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("event_labels")
    op.drop_table("data_labels")
