"""Webhooks: registered endpoints and the delivery log.

Revision ID: 0004_webhooks
Revises: 0003_similar
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_webhooks"
down_revision = "0003_similar"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("events", sa.Text, nullable=False),
        sa.Column("filter", sa.Text, nullable=False),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("after_seq", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_webhooks_org", "webhooks", ["org", "created_at"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column(
            "webhook_id",
            sa.String(32),
            sa.ForeignKey("webhooks.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("org", sa.String(64), nullable=False),
        sa.Column("event_seq", sa.BigInteger, nullable=True),
        sa.Column("data_id", sa.String(36), nullable=True),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger, nullable=False),
        sa.Column("last_attempt_at", sa.BigInteger, nullable=True),
        sa.Column("response_status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("lease_token", sa.String(32), nullable=True),
        sa.Column("lease_until", sa.BigInteger, nullable=True),
    )
    op.create_index(
        "ix_webhook_deliveries_event",
        "webhook_deliveries",
        ["webhook_id", "event_seq"],
        unique=True,
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"]
    )
    op.create_index(
        "ix_webhook_deliveries_item", "webhook_deliveries", ["webhook_id", "data_id", "event_seq"]
    )
    op.create_index(
        "ix_webhook_deliveries_log", "webhook_deliveries", ["webhook_id", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_webhooks_org", "webhooks")
    op.drop_table("webhooks")
