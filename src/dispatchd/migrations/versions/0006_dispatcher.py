"""the conversation dispatcher (seed 001): agents, the rotation, conversations, their messages, held
messages, the scheduled distribution

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("phone", sa.String(length=20), nullable=True),
        sa.Column("email", sa.String(length=200), nullable=True),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("presence", sa.String(length=16), nullable=False),
        sa.Column("open_conversations", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("phone", name=op.f("uq_agents_phone")),
        sa.UniqueConstraint("email", name=op.f("uq_agents_email")),
    )
    op.create_index("ix_agents_presence_last_heartbeat_at", "agents", ["presence", "last_heartbeat_at"])
    op.create_table(
        "agent_queue",
        sa.Column("agent_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_agent_queue_agent_id_agents"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agent_queue")),
    )
    op.create_index("ix_agent_queue_position", "agent_queue", ["position"])
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("customer_phone", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_customer_message_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("awaiting_reply_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_assigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_reply_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pending_notice_sent", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("reassignments", sa.Integer(), server_default="0", nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_reason", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_conversations_agent_id_agents")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    op.create_index(
        "uq_conversations_open_customer_phone",
        "conversations",
        ["customer_phone"],
        unique=True,
        postgresql_where=sa.text("status <> 'CLOSED'"),
        sqlite_where=sa.text("status <> 'CLOSED'"),
    )
    op.create_index("ix_conversations_status_pending_since", "conversations", ["status", "pending_since"])
    op.create_index(
        "ix_conversations_status_last_customer_message_at",
        "conversations",
        ["status", "last_customer_message_at"],
    )
    op.create_index(
        "ix_conversations_status_awaiting_reply_since", "conversations", ["status", "awaiting_reply_since"]
    )
    op.create_index("ix_conversations_agent_id_status", "conversations", ["agent_id", "status"])
    op.create_table(
        "conversation_messages",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("direction", sa.String(length=3), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("inbound_message_id", sa.String(length=40), nullable=True),
        sa.Column("notification_id", sa.String(length=40), nullable=True),
        sa.Column("agent_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_messages_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversation_messages")),
        sa.UniqueConstraint("inbound_message_id", name=op.f("uq_conversation_messages_inbound_message_id")),
    )
    op.create_index(
        "ix_conversation_messages_conversation_id_created_at",
        "conversation_messages",
        ["conversation_id", "created_at"],
    )
    op.create_table(
        "pending_messages",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("conversation_message_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_pending_messages_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_messages")),
    )
    op.create_index("ix_pending_messages_created_at", "pending_messages", ["created_at"])
    op.create_table(
        "dispatcher_schedule",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expression", sa.String(length=120), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_dispatcher_schedule")),
    )


def downgrade() -> None:
    op.drop_table("dispatcher_schedule")
    op.drop_index("ix_pending_messages_created_at", table_name="pending_messages")
    op.drop_table("pending_messages")
    op.drop_index("ix_conversation_messages_conversation_id_created_at", table_name="conversation_messages")
    op.drop_table("conversation_messages")
    for index in (
        "ix_conversations_agent_id_status",
        "ix_conversations_status_awaiting_reply_since",
        "ix_conversations_status_last_customer_message_at",
        "ix_conversations_status_pending_since",
        "uq_conversations_open_customer_phone",
    ):
        op.drop_index(index, table_name="conversations")
    op.drop_table("conversations")
    op.drop_index("ix_agent_queue_position", table_name="agent_queue")
    op.drop_table("agent_queue")
    op.drop_index("ix_agents_presence_last_heartbeat_at", table_name="agents")
    op.drop_table("agents")
