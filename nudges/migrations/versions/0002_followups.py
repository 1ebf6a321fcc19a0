"""Follow-ups scheduled by FHIR notifications, and cards waiting for the patient's next hook call.

`followups.patient_ref` holds the FHIR patient id (an operational identifier needed to fetch the
patient's data when the follow-up is due); it is set to NULL as soon as the follow-up completes.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "followups",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("rule_id", sa.String(128), nullable=False),
        sa.Column("patient_hash", sa.String(64), nullable=False),
        sa.Column("patient_ref", sa.String(64)),
        sa.Column("start_ref", sa.String(200), nullable=False),
        sa.Column("fhir_server", sa.String(512)),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claimed_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("rule_id", "patient_hash", "start_ref", name="uq_followups_start"),
    )
    op.create_index("ix_followups_status_due", "followups", ["status", "due_at"])
    op.create_table(
        "pending_cards",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("rule_id", sa.String(128), nullable=False),
        sa.Column("patient_hash", sa.String(64), nullable=False),
        sa.Column("card", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_pending_cards_patient", "pending_cards", ["patient_hash", "delivered_at"])


def downgrade() -> None:
    op.drop_table("pending_cards")
    op.drop_table("followups")
