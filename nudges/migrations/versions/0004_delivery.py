"""Push delivery of follow-up cards (the outbox) and the Subscriptions the service manages.

`deliveries.payload` names the patient (references, card text) until the push is sent, then it is
emptied; `subscriptions` keeps only a hash of each subscription's secret.

Revision ID: 0004
Revises: 0003 (only its own tables: independent of 0003's)
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("card_uuid", sa.String(36), nullable=False),
        sa.Column("target", sa.String(140), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("rule_id", sa.String(128), nullable=False),
        sa.Column("patient_hash", sa.String(64), nullable=False),
        sa.Column("fhir_server", sa.String(512)),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claimed_at", sa.DateTime(timezone=True)),
        sa.Column("last_error", sa.String(300)),
        sa.Column("location", sa.String(512)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("card_uuid", "target", name="uq_deliveries_card_target"),
    )
    op.create_index("ix_deliveries_status_due", "deliveries", ["status", "due_at"])
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("server", sa.String(512), nullable=False),
        sa.Column("topic", sa.String(512), nullable=False),
        sa.Column("filter", sa.String(512)),
        sa.Column("endpoint", sa.String(512), nullable=False),
        sa.Column("resource_id", sa.String(128)),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("server_status", sa.String(16)),
        sa.Column("heartbeat_seconds", sa.Integer, nullable=False),
        sa.Column("resource_types", sa.JSON, nullable=False),
        sa.Column("last_event", sa.Integer, nullable=False),
        sa.Column("above", sa.JSON, nullable=False),
        sa.Column("server_events", sa.Integer),
        sa.Column("last_event_at", sa.String(40)),
        sa.Column("last_seen_at", sa.DateTime(timezone=True)),
        sa.Column("gap_since", sa.DateTime(timezone=True)),
        sa.Column("reason", sa.String(300)),
        sa.Column("checked_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("subscriptions")
    op.drop_table("deliveries")
