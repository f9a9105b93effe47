"""The ``notifications`` table: one row per outgoing message (the transactional outbox)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.db import Base
from dispatchd.core.types import UTCDateTime


class NotificationStatus(StrEnum):
    PENDING = "PENDING"
    SENDING = "SENDING"
    SENT = "SENT"
    DELIVERED = "DELIVERED"  # provider status webhooks
    READ = "READ"
    FAILED = "FAILED"  # temporary failure, next attempt scheduled
    FAILED_PERMANENT = "FAILED_PERMANENT"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


#: Statuses the delivery worker still has to act on (``next_attempt_at`` is their deadline).
OPEN_STATUSES = (NotificationStatus.PENDING, NotificationStatus.SENDING, NotificationStatus.FAILED)


class Notification(Base):
    __tablename__ = "notifications"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    category: Mapped[str] = mapped_column(String(40))
    recipient: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    subject: Mapped[str | None] = mapped_column(String(80))
    status: Mapped[str] = mapped_column(String(20), default=NotificationStatus.PENDING.value)
    #: claim order across the outbox, lower first (:class:`dispatchd.notifications.policy.Priority`)
    priority: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    channel: Mapped[str | None] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(40))
    error_kind: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: provider timestamp of the last status update applied (webhooks arrive out of order)
    status_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: why a CANCELLED message was made moot ("booking assigned", "driver busy", …)
    cancel_reason: Mapped[str | None] = mapped_column(String(80))
    #: the message that carried this one to the provider (several open offers, one WhatsApp message)
    carried_by: Mapped[str | None] = mapped_column(String(40))

    __table_args__ = (
        Index("ix_notifications_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_notifications_status_priority_next_attempt_at", "status", "priority", "next_attempt_at"),
        Index("ix_notifications_status_expires_at", "status", "expires_at"),
        Index("ix_notifications_subject", "subject"),
        Index("ix_notifications_recipient_status", "recipient", "status"),
        Index("ix_notifications_provider_message_id", "provider_message_id"),
        Index("ix_notifications_created_at", "created_at"),
    )


class RecipientPacing(Base):
    """When each phone may get its next message (Meta's pair rate limit: about one per 6 s per user).

    A claim takes a phone's slot with one conditional upsert, so two workers never both send to it."""

    __tablename__ = "recipient_pacing"

    recipient: Mapped[str] = mapped_column(String(200), primary_key=True)
    next_slot_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RoutingStatus(StrEnum):
    """Where an inbound message is on its way to a domain (:mod:`dispatchd.notifications.inbox`)."""

    PENDING = "PENDING"  # due at ``next_attempt_at``; also after a failed attempt, until the limit
    ROUTED = "ROUTED"  # a handler took it; ``handler`` and ``outcome`` say which and what happened
    UNROUTED = "UNROUTED"  # no handler takes it: kept for an operator (``GET /v1/inbound``)
    FAILED = "FAILED"  # every attempt failed; ``attempts`` and ``last_error`` say how


class InboundMessage(Base):
    """A message or button reply received by webhook, stored once per provider id (Meta re-delivers),
    with its routing state: routing is work on this row, claimed by the sweeper, never a step that a
    crash can skip."""

    __tablename__ = "inbound_messages"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_message_id: Mapped[str] = mapped_column(String(200), unique=True)
    from_phone: Mapped[str] = mapped_column(String(40))
    type: Mapped[str] = mapped_column(String(30))
    text: Mapped[str | None] = mapped_column(Text)
    button_id: Mapped[str | None] = mapped_column(String(200))
    context_message_id: Mapped[str | None] = mapped_column(String(200))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    outcome: Mapped[str | None] = mapped_column(String(200))
    raw: Mapped[dict[str, Any]] = mapped_column(JSON)
    routing_status: Mapped[str] = mapped_column(
        String(20), default=RoutingStatus.PENDING.value, server_default="PENDING"
    )
    #: the handler that took the message (``matching.offer_button``…)
    handler: Mapped[str | None] = mapped_column(String(40))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_inbound_messages_routing_status_next_attempt_at", "routing_status", "next_attempt_at"),
        Index("ix_inbound_messages_received_at", "received_at"),
    )


class AlertState(Base):
    """When each alert rule last fired: its cooldown survives restarts and is shared by instances."""

    __tablename__ = "alert_state"

    rule: Mapped[str] = mapped_column(String(60), primary_key=True)
    last_fired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    detail: Mapped[str | None] = mapped_column(Text)
