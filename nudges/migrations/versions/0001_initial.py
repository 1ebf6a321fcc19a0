"""Cards issued, feedback, replayed-token guard and service secrets.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.create_table(
        "cards",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("rule_id", sa.String(128), nullable=False),
        sa.Column("rule_version", sa.String(32), nullable=False),
        sa.Column("hook", sa.String(64), nullable=False),
        sa.Column("hook_instance", sa.String(64), nullable=False),
        sa.Column("patient_hash", sa.String(64), nullable=False),
        sa.Column("race", sa.String(64), nullable=False),
        sa.Column("ethnicity", sa.String(64), nullable=False),
        sa.Column("language", sa.String(32), nullable=False),
        sa.Column("payer_class", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(128)),
        sa.Column("indicator", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_cards_patient_rule", "cards", ["patient_hash", "rule_id", "issued_at"])
    op.create_index("ix_cards_issued_at", "cards", ["issued_at"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
        sa.Column("card_uuid", sa.String(36), nullable=False),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("accepted_suggestions", sa.JSON),
        sa.Column("override_system", sa.String(256)),
        sa.Column("override_code", sa.String(128)),
        sa.Column("has_comment", sa.Boolean, nullable=False),
        sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"])
    op.create_table(
        "seen_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_seen_tokens_expires_at", "seen_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_table("seen_tokens")
    op.drop_table("feedback")
    op.drop_table("cards")
    op.drop_table("meta")
