"""realtime: the secret that signs stream tokens (shared by every instance); held messages indexed by
conversation

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_server_secrets")),
    )
    op.create_index("ix_pending_messages_conversation_id", "pending_messages", ["conversation_id"])


def downgrade() -> None:
    op.drop_index("ix_pending_messages_conversation_id", table_name="pending_messages")
    op.drop_table("server_secrets")
