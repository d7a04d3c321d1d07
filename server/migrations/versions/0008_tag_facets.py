"""Tag facets: data_tags gets its item's org and an (org, tag) index, so that one
organization's distinct tags are an index walk (GET /v1/facets/tags) that never reads or
reveals another organization's tags.

The backfill reads each tag row's item once (one pass over data_tags at upgrade).

Revision ID: 0008_tag_facets
Revises: 0007_dataset_labels
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_tag_facets"
down_revision = "0007_dataset_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("data_tags", sa.Column("org", sa.String(64), nullable=True))
    op.execute(
        "UPDATE data_tags SET org = (SELECT org FROM data WHERE data.id = data_tags.data_id)"
    )
    with op.batch_alter_table("data_tags") as batch:
        batch.alter_column("org", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_data_tags_org_tag", "data_tags", ["org", "tag"])


def downgrade() -> None:
    op.drop_index("ix_data_tags_org_tag", table_name="data_tags")
    with op.batch_alter_table("data_tags") as batch:
        batch.drop_column("org")
