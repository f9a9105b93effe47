"""Writing to the outbox: other domains call :func:`enqueue` inside their own unit of work.

The row and the state change that causes it commit together, so a message is never lost and never
sent for a change that rolled back. The channel is chosen at delivery time from the settings.

A change that makes a queued message pointless cancels it in the same unit of work (:func:`cancel`),
and a domain asks :func:`handed_recipients` who actually got a message before following it up (DESIGN.md
"The outbox at a real peak": no "course prise" to a driver who never saw the offer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import bulk, events, topics
from dispatchd.core.db import lock_for_update
from dispatchd.core.ids import new_id
from dispatchd.notifications.channels.base import OutboundMessage
from dispatchd.notifications.models import Notification, NotificationStatus
from dispatchd.notifications.policy import ADMIN_ALERT, priority_for

#: Not yet handed to a provider: what a cancellation can still take back (SENDING is in flight).
UNSENT_STATUSES = (NotificationStatus.PENDING.value, NotificationStatus.FAILED.value)
#: Handed to the provider: the recipient may have seen it.
HANDED_STATUSES = (
    NotificationStatus.SENT.value,
    NotificationStatus.DELIVERED.value,
    NotificationStatus.READ.value,
)


@dataclass(frozen=True)
class Message:
    """One message to write: ``recipient`` is an E.164 phone (or ``"admin"``), ``body`` plain text;
    ``priority`` defaults to the category's (:func:`dispatchd.notifications.policy.priority_for`)."""

    recipient: str
    category: str
    body: str
    subject: str | None = None
    payload: dict[str, Any] | None = field(default=None)
    expires_at: datetime | None = None
    idempotency_key: str | None = None
    priority: int | None = None


@dataclass(frozen=True)
class Combined:
    """One message that carries several outbox rows to one recipient: ``ids[0]`` is the carrier (its id
    goes to the provider), the others are recorded with its outcome."""

    ids: tuple[str, ...]
    body: str
    payload: dict[str, Any]


#: Builds one message out of a recipient's open rows of one category (at least two, oldest first).
#: It may leave some out (e.g. keep the ten nearest offers): those stay queued.
Coalescer = Callable[[Sequence[OutboundMessage]], Combined]


#: the columns :func:`enqueue` writes per message (the others: PENDING, 0 attempts, due and created now)
ENQUEUED_COLUMNS = (
    "id",
    "category",
    "recipient",
    "body",
    "payload",
    "subject",
    "priority",
    "expires_at",
    "idempotency_key",
)


async def enqueue(session: AsyncSession, messages: list[Message]) -> list[str]:
    """Insert messages in the current unit of work (one bulk insert); return their ids.

    Written PENDING with ``next_attempt_at`` = now, so the delivery worker picks them up at once. The ids
    of one call ascend in the list's order, so that the claim's last tie-break (priority, next_attempt_at,
    id) sends them in that order: a broadcast's offers go out in rank order (seed 000 §2.2 priorityMode).
    """
    if not messages:
        return []
    now = session.info["now"]
    ids = sorted(new_id("ntf") for _ in messages)  # random ids, handed out in ascending order
    rows = [
        (
            row_id,
            message.category,
            message.recipient,
            message.body,
            message.payload,
            message.subject,
            priority_for(message.category) if message.priority is None else message.priority,
            message.expires_at,
            message.idempotency_key,
        )
        for row_id, message in zip(ids, messages, strict=True)
    ]
    # A broadcast writes thousands at once: COPY on PostgreSQL, one executemany on SQLite.
    await bulk.insert_many(
        session,
        Notification.__table__,
        ENQUEUED_COLUMNS,
        rows,
        shared={
            "status": NotificationStatus.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        },
    )
    session.info["notifications_written"] = session.info.get("notifications_written", 0) + len(rows)
    events.wake_listeners(session)  # delivery in other processes (`dispatchd worker`) is woken at commit
    raised: dict[str, list[str]] = {}
    for row_id, category, _, body, *_ in rows:
        if category == ADMIN_ALERT:
            raised.setdefault(body, []).append(row_id)
    for text, alert_ids in raised.items():  # one event per alert, whatever the number of admins told
        events.append(session, topics.ALERTS, "AlertRaised", {"text": text, "notification_ids": alert_ids})
    return ids


@dataclass(frozen=True)
class Cancellation:
    """Which queued messages a change makes moot: those of ``categories`` about ``subject`` and/or to
    ``recipients`` (at least one of the two), and why (``reason``, ≤ 80 characters, kept on the row)."""

    reason: str
    categories: tuple[str, ...]
    subject: str | None = None
    recipients: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.subject is None and self.recipients is None:
            raise ValueError("a cancellation needs a subject or recipients")

    def where(self) -> ColumnElement[bool]:
        filters = [Notification.category.in_(self.categories)]
        if self.subject is not None:
            filters.append(Notification.subject == self.subject)
        if self.recipients is not None:
            filters.append(Notification.recipient.in_(sorted(set(self.recipients))))
        return and_(*filters)


async def cancel(session: AsyncSession, cancellations: Sequence[Cancellation]) -> list[list[str]]:
    """Cancel, in the current unit of work, the messages each cancellation names that are not yet handed
    to a provider (PENDING or FAILED → CANCELLED with ``cancel_reason``); return, per cancellation, the
    recipients of the rows it cancelled.

    A message in flight (SENDING) cannot be taken back: it gets the ``cancel_reason`` and keeps its
    status. If its send succeeds it is SENT; if it fails, it becomes CANCELLED instead of being retried,
    and no claim takes it again. All rows are locked first in one statement, in id order, so two changes
    cancelling overlapping rows never deadlock.
    """
    rules = [rule for rule in cancellations if rule.recipients is None or rule.recipients]
    if not rules:
        return [[] for _ in cancellations]
    unsent = Notification.status.in_(UNSENT_STATUSES)
    in_flight = (Notification.status == NotificationStatus.SENDING.value) & Notification.cancel_reason.is_(
        None
    )
    await session.execute(
        lock_for_update(
            select(Notification.id)
            .where(unsent | in_flight, or_(*(rule.where() for rule in rules)))
            .order_by(Notification.id)
        )
    )
    results: dict[int, list[str]] = {}
    for rule in rules:
        rows = await session.execute(
            update(Notification)
            .where(unsent, rule.where())
            .values(
                status=NotificationStatus.CANCELLED.value,
                next_attempt_at=None,
                cancel_reason=rule.reason[:80],
            )
            .returning(Notification.recipient)
            .execution_options(synchronize_session=False)
        )
        results[id(rule)] = sorted(rows.scalars().all())
        await session.execute(
            update(Notification)
            .where(in_flight, rule.where())
            .values(cancel_reason=rule.reason[:80])
            .execution_options(synchronize_session=False)
        )
    return [results.get(id(rule), []) for rule in cancellations]


async def handed_recipients(session: AsyncSession, *, subject: str, category: str) -> set[str]:
    """Recipients whose ``category`` message about ``subject`` was handed to the provider (SENT, DELIVERED
    or READ, including messages carried inside another one). A message still in flight does not count:
    it may yet fail."""
    rows = await session.scalars(
        select(Notification.recipient)
        .where(
            Notification.subject == subject,
            Notification.category == category,
            Notification.status.in_(HANDED_STATUSES),
        )
        .distinct()
    )
    return set(rows.all())


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
