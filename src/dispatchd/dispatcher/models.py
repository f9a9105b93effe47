"""The dispatcher's entities (seed 001 §4): agents, their place in the rotation, conversations, the
messages of a conversation's thread, and the messages held while no agent can take them.

Invariants held by the database:

* one open conversation per customer: a unique index on ``customer_phone`` where ``status`` is not
  CLOSED;
* an agent never above capacity: ``open_conversations`` only grows by ``UPDATE … WHERE
  open_conversations < capacity AND presence = 'ONLINE'``, checked by ``rowcount``;
* an inbound message belongs to one conversation: a unique ``inbound_message_id``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.db import Base
from dispatchd.core.types import UTCDateTime


class Presence(StrEnum):
    ONLINE = "ONLINE"
    AWAY = "AWAY"  # connected, takes no new conversation, keeps its own
    OFFLINE = "OFFLINE"


class ConversationStatus(StrEnum):
    PENDING = "PENDING"  # no agent: held until one can take it
    ASSIGNED = "ASSIGNED"
    CLOSED = "CLOSED"


class Direction(StrEnum):
    IN = "IN"  # from the customer
    OUT = "OUT"  # from an agent, through the outbox


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(20), unique=True)
    email: Mapped[str | None] = mapped_column(String(200), unique=True)
    #: most open conversations at once
    capacity: Mapped[int] = mapped_column(Integer, default=10)
    presence: Mapped[str] = mapped_column(String(16), default=Presence.OFFLINE.value)
    #: ASSIGNED conversations held now (kept with every assignment, in the same transaction)
    open_conversations: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    connected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_agents_presence_last_heartbeat_at", "presence", "last_heartbeat_at"),)


class QueuePosition(Base):
    """An agent's place in the rotation (seed 001 §4.3): the lowest ``position`` is next."""

    __tablename__ = "agent_queue"

    agent_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_agent_queue_position", "position"),)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    customer_phone: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("agents.id"))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_message_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: the customer's last message: WhatsApp's 24 h window, and the idle close, run from it
    last_customer_message_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: the oldest customer message not yet answered by an agent (None once answered)
    awaiting_reply_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    first_assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    first_reply_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    pending_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: the "we will answer you shortly" message went out (once per conversation)
    pending_notice_sent: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    reassignments: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    close_reason: Mapped[str | None] = mapped_column(String(40))

    __table_args__ = (
        Index(
            "uq_conversations_open_customer_phone",
            "customer_phone",
            unique=True,
            postgresql_where=text("status <> 'CLOSED'"),
            sqlite_where=text("status <> 'CLOSED'"),
        ),
        Index("ix_conversations_status_pending_since", "status", "pending_since"),
        Index("ix_conversations_status_last_customer_message_at", "status", "last_customer_message_at"),
        Index("ix_conversations_status_awaiting_reply_since", "status", "awaiting_reply_since"),
        Index("ix_conversations_agent_id_status", "agent_id", "status"),
    )


class ConversationMessage(Base):
    """One message of a conversation's thread, in order (``created_at``, then ``id``)."""

    __tablename__ = "conversation_messages"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("conversations.id", ondelete="CASCADE")
    )
    direction: Mapped[str] = mapped_column(String(3))
    body: Mapped[str | None] = mapped_column(Text)
    #: the inbox row it came from (inbound), unique: a message belongs to one conversation
    inbound_message_id: Mapped[str | None] = mapped_column(String(40), unique=True)
    #: the outbox row that carries it (outbound)
    notification_id: Mapped[str | None] = mapped_column(String(40))
    agent_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_conversation_messages_conversation_id_created_at", "conversation_id", "created_at"),
    )


class PendingMessage(Base):
    """A customer message held while no agent can take its conversation (seed 001 §4.6)."""

    __tablename__ = "pending_messages"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("conversations.id", ondelete="CASCADE")
    )
    conversation_message_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_pending_messages_created_at", "created_at"),
        Index("ix_pending_messages_conversation_id", "conversation_id"),
    )


class ScheduledRun(Base):
    """When a scheduled job (``scheduled_distribution``) runs next: a deadline on a row, claimed by
    the sweeper, so several instances run it once."""

    __tablename__ = "dispatcher_schedule"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expression: Mapped[str] = mapped_column(String(120))
