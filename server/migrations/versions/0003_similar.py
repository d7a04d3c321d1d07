"""Near-duplicate search: a 64-bit dHash per image, its mirror's, and three indexed bands
(21, 21 and 22 bits).

Revision ID: 0003_similar
Revises: 0002_datasets
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_similar"
down_revision = "0002_datasets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_hashes",
        sa.Column(
            "data_id",
            sa.String(36),
            sa.ForeignKey("data.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("dhash", sa.BigInteger, nullable=True),
        sa.Column("mirror", sa.BigInteger, nullable=True),
        *(sa.Column(f"band{i}", sa.Integer, nullable=True) for i in range(3)),
    )
    for i in range(3):
        op.create_index(
            f"ix_image_hashes_band{i}", "image_hashes", ["org", f"band{i}", "dhash", "data_id"]
        )


def downgrade() -> None:
    for i in range(3):
        op.drop_index(f"ix_image_hashes_band{i}", "image_hashes")
    op.drop_table("image_hashes")
