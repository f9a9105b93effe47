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
    channel: Mapped[str | None] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_notifications_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_notifications_subject", "subject"),
        Index("ix_notifications_recipient", "recipient"),
    )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "category": self.category,
            "recipient": self.recipient,
            "body": self.body,
            "payload": self.payload,
            "subject": self.subject,
            "status": self.status,
            "channel": self.channel,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "expires_at": self.expires_at,
            "provider_message_id": self.provider_message_id,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "sent_at": self.sent_at,
        }
