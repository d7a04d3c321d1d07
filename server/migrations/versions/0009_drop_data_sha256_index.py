"""The data table loses its index on sha256: no query reads it (content is found by blob_key,
which has its own index, and sha256 is not a filter field), and every stored item paid for it,
one more index page touched at a random place, of the few each item's commit writes.

Revision ID: 0009_drop_data_sha256_index
Revises: 0008_tag_facets
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0009_drop_data_sha256_index"
down_revision = "0008_tag_facets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_data_sha256", table_name="data")


def downgrade() -> None:
    op.create_index("ix_data_sha256", "data", ["sha256"])
