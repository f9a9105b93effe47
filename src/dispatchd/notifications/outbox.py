"""Writing to the outbox: other domains call :func:`enqueue` inside their own unit of work.

The row and the state change that causes it commit together, so a message is never lost and never
sent for a change that rolled back. The channel is chosen at delivery time from the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.ids import new_id
from dispatchd.notifications.models import Notification, NotificationStatus


@dataclass(frozen=True)
class Message:
    """One message to write: ``recipient`` is an E.164 phone (or ``"admin"``), ``body`` plain text."""

    recipient: str
    category: str
    body: str
    subject: str | None = None
    payload: dict[str, Any] | None = field(default=None)
    expires_at: datetime | None = None
    idempotency_key: str | None = None


async def enqueue(session: AsyncSession, messages: list[Message]) -> list[str]:
    """Insert messages in the current unit of work (one bulk insert); return their ids.

    Written PENDING with ``next_attempt_at`` = now, so the delivery worker picks them up at once.
    """
    if not messages:
        return []
    now = session.info["now"]
    rows = [
        {
            "id": new_id("ntf"),
            "category": message.category,
            "recipient": message.recipient,
            "body": message.body,
            "payload": message.payload,
            "subject": message.subject,
            "status": NotificationStatus.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "expires_at": message.expires_at,
            "idempotency_key": message.idempotency_key,
            "created_at": now,
        }
        for message in messages
    ]
    await session.execute(Notification.__table__.insert(), rows)
    session.info["notifications_written"] = session.info.get("notifications_written", 0) + len(rows)
    return [row["id"] for row in rows]


async def list_notifications(
    session: AsyncSession,
    *,
    status: str | None = None,
    category: str | None = None,
    recipient: str | None = None,
    subject: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Notification], int]:
    """A page of notifications (newest first) and the total matching the filters."""
    filters = []
    if status:
        filters.append(Notification.status == status)
    if category:
        filters.append(Notification.category == category)
    if recipient:
        filters.append(Notification.recipient == recipient)
    if subject:
        filters.append(Notification.subject == subject)
    if created_from:
        filters.append(Notification.created_at >= created_from)
    if created_to:
        filters.append(Notification.created_at < created_to)
    total = await session.scalar(select(func.count()).select_from(Notification).where(*filters))
    rows = await session.scalars(
        select(Notification)
        .where(*filters)
        .order_by(Notification.created_at.desc(), Notification.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows.all()), int(total or 0)
