"""Thumbnails: the previews made of each item, stored as blobs beside the items' own.

Revision ID: 0005_thumbnails
Revises: 0004_webhooks
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_thumbnails"
down_revision = "0004_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "thumbnails",
        sa.Column(
            "data_id",
            sa.String(36),
            sa.ForeignKey("data.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("size", sa.Integer, primary_key=True),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.Text, nullable=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_thumbnails_source", "thumbnails", ["source_sha256", "size"])
    op.create_index("ix_thumbnails_blob_key", "thumbnails", ["blob_key"])


def downgrade() -> None:
    op.drop_table("thumbnails")
