"""notifications delivery

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_state",
        sa.Column("rule", sa.String(length=60), nullable=False),
        sa.Column("last_fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("rule", name=op.f("pk_alert_state")),
    )
    op.create_table(
        "inbound_messages",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("provider_message_id", sa.String(length=200), nullable=False),
        sa.Column("from_phone", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=30), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("button_id", sa.String(length=200), nullable=True),
        sa.Column("context_message_id", sa.String(length=200), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=200), nullable=True),
        sa.Column("raw", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbound_messages")),
        sa.UniqueConstraint("provider_message_id", name=op.f("uq_inbound_messages_provider_message_id")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_code", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("error_kind", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("read_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("status_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_notifications_created_at", ["created_at"], unique=False)
        batch_op.create_index("ix_notifications_provider_message_id", ["provider_message_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_provider_message_id")
        batch_op.drop_index("ix_notifications_created_at")
        batch_op.drop_column("status_at")
        batch_op.drop_column("read_at")
        batch_op.drop_column("failed_at")
        batch_op.drop_column("delivered_at")
        batch_op.drop_column("error_kind")
        batch_op.drop_column("error_code")

    op.drop_table("inbound_messages")
    op.drop_table("alert_state")
