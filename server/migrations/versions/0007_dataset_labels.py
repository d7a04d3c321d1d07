"""Dataset versions freeze their items' labels (dataset_item_labels), as they freeze tags.

Versions created before this revision keep no labels: the items' labels at their creation are
not known any more, so none are made up.

Revision ID: 0007_dataset_labels
Revises: 0006_labels
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_dataset_labels"
down_revision = "0006_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_item_labels",
        sa.Column("dataset_id", sa.String(36), primary_key=True),
        sa.Column("data_id", sa.String(36), primary_key=True),
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id", "data_id"],
            ["dataset_items.dataset_id", "dataset_items.id"],
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("dataset_item_labels")
