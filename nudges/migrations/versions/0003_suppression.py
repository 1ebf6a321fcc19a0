"""Suppression keyed by what a card is about, driven by feedback: `cards.focus` (a keyed hash of the
card's focus: the patient's chart, an encounter, a draft order, an appointment) and `suppressions`, one
row per (patient, rule, focus) with the display window and the lockout set by the latest feedback.

Cards issued before this revision have no focus (NULL): feedback on them is taken as about the chart.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cards") as batch:
        batch.add_column(sa.Column("focus", sa.String(64)))
    op.create_table(
        "suppressions",
        sa.Column("patient_hash", sa.String(64), primary_key=True),
        sa.Column("rule_id", sa.String(128), primary_key=True),
        sa.Column("focus", sa.String(64), primary_key=True),
        sa.Column("card_uuid", sa.String(36)),
        sa.Column("shown_at", sa.DateTime(timezone=True)),
        sa.Column("shown_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.Integer),
        sa.Column("feedback_at", sa.DateTime(timezone=True)),
        sa.Column("feedback_key", sa.String(64)),
        sa.Column("feedback_until", sa.DateTime(timezone=True)),
        sa.Column("outcome", sa.String(16)),
        sa.Column("reason_code", sa.String(128)),
    )


def downgrade() -> None:
    op.drop_table("suppressions")
    with op.batch_alter_table("cards") as batch:
        batch.drop_column("focus")
