"""outbox at a real peak: priority, moot cancellation, coalescing, per-recipient pacing slots

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recipient_pacing",
        sa.Column("recipient", sa.String(length=200), nullable=False),
        sa.Column("next_slot_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("recipient", name=op.f("pk_recipient_pacing")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("cancel_reason", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("carried_by", sa.String(length=40), nullable=True))
        batch_op.drop_index("ix_notifications_recipient")
        batch_op.create_index("ix_notifications_recipient_status", ["recipient", "status"], unique=False)
        batch_op.create_index(
            "ix_notifications_status_priority_next_attempt_at",
            ["status", "priority", "next_attempt_at"],
            unique=False,
        )
        batch_op.create_index("ix_notifications_status_expires_at", ["status", "expires_at"], unique=False)
    # Rows written before this revision get their category's priority.
    op.execute("UPDATE notifications SET priority = 0 WHERE category = 'admin_alert'")
    op.execute("UPDATE notifications SET priority = 2 WHERE category = 'driver_offer'")
    op.execute("UPDATE notifications SET priority = 3 WHERE category IN ('offer_taken', 'offer_cancelled')")


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_status_expires_at")
        batch_op.drop_index("ix_notifications_status_priority_next_attempt_at")
        batch_op.drop_index("ix_notifications_recipient_status")
        batch_op.create_index("ix_notifications_recipient", ["recipient"], unique=False)
        batch_op.drop_column("carried_by")
        batch_op.drop_column("cancel_reason")
        batch_op.drop_column("priority")
    op.drop_table("recipient_pacing")
