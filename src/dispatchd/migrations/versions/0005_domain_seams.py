"""domain seams: the inbound inbox's routing state, keys bound to a subject, the customer's answer
after a search timed out

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("routing_status", sa.String(length=20), server_default="PENDING", nullable=False)
        )
        batch_op.add_column(sa.Column("handler", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("routed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_inbound_messages_routing_status_next_attempt_at",
            ["routing_status", "next_attempt_at"],
            unique=False,
        )
        batch_op.create_index("ix_inbound_messages_received_at", ["received_at"], unique=False)
    # Taps stored but never routed (a crash between the two steps) and failed routings are due now;
    # plain texts were stored without a handler (UNROUTED: not answered days later); the rest were routed.
    op.execute(
        "UPDATE inbound_messages SET routing_status = 'PENDING', next_attempt_at = received_at"
        " WHERE outcome IS NULL OR outcome = 'ROUTING_FAILED'"
    )
    op.execute(
        "UPDATE inbound_messages SET routing_status = 'UNROUTED', outcome = NULL, routed_at = received_at"
        " WHERE outcome = 'STORED'"
    )
    op.execute(
        "UPDATE inbound_messages SET routing_status = 'ROUTED', handler = 'matching.offer_button',"
        " routed_at = received_at WHERE routing_status = 'PENDING' AND next_attempt_at IS NULL"
    )

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject", sa.String(length=80), nullable=True))
    op.execute("UPDATE api_keys SET subject = 'driver:' || driver_id WHERE driver_id IS NOT NULL")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("driver_id")

    with op.batch_alter_table("bookings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("customer_answer", sa.String(length=20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bookings", schema=None) as batch_op:
        batch_op.drop_column("customer_answer")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("driver_id", sa.String(length=40), nullable=True))
    op.execute("UPDATE api_keys SET driver_id = substr(subject, 8) WHERE subject LIKE 'driver:%'")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("subject")
    # Back to 0004's outcomes, so that an upgrade again does not take old texts for unrouted taps.
    op.execute("UPDATE inbound_messages SET outcome = 'STORED' WHERE routing_status = 'UNROUTED'")
    op.execute("UPDATE inbound_messages SET outcome = 'ROUTING_FAILED' WHERE routing_status = 'FAILED'")
    with op.batch_alter_table("inbound_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_inbound_messages_received_at")
        batch_op.drop_index("ix_inbound_messages_routing_status_next_attempt_at")
        batch_op.drop_column("routed_at")
        batch_op.drop_column("last_error")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("attempts")
        batch_op.drop_column("handler")
        batch_op.drop_column("routing_status")
