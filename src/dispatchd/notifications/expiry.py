"""Expiry of outbox rows as a deadline (issue 7): a message past ``expires_at`` is never sent late.

The sweeper runs :meth:`OutboxExpiry.expire_due` every tick: every row past ``expires_at`` that nobody is
sending (PENDING, FAILED, or SENDING whose lease ran out) becomes EXPIRED in bulk, whatever pacing or
priority say, so no PENDING row outlives its expiry by more than a sweep. The delivery claim leaves such
rows out, and a message whose rows all expired between claim and send is not sent.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, metrics, topics
from dispatchd.core.db import Database
from dispatchd.notifications import pacing
from dispatchd.notifications.models import Notification, NotificationStatus
from dispatchd.notifications.outbox import UNSENT_STATUSES

#: How often pacing slots that ended long ago are forgotten (s).
FORGET_SLOTS_EVERY_S = 60.0


def _expirable(now: datetime) -> ColumnElement[bool]:
    """Rows past ``expires_at`` that nobody is sending (a SENDING row whose lease ran out counts)."""
    return and_(
        Notification.expires_at <= now,
        or_(
            Notification.status.in_(UNSENT_STATUSES),
            (Notification.status == NotificationStatus.SENDING.value) & (Notification.next_attempt_at <= now),
        ),
    )


class OutboxExpiry:
    """The ``notification_expiry`` deadline: ``expire_due`` and ``oldest_due`` for the sweeper."""

    def __init__(self) -> None:
        self._slots_forgotten_at: datetime | None = None

    async def expire_due(self, db: Database, limit: int) -> int:
        """Expire at most ``limit`` due rows (oldest expiry first, ``SKIP LOCKED``), end the messages made
        moot in flight that are open again (``cancel_reason`` set: lease over, or put back by a late
        provider status) as CANCELLED; return how many rows changed.
        Also forgets pacing slots that ended long ago, at most every :data:`FORGET_SLOTS_EVERY_S`."""
        async with db.transaction() as session:
            now: datetime = session.info["now"]
            ids = list(
                (
                    await session.scalars(
                        select(Notification.id)
                        .where(_expirable(now))
                        .order_by(Notification.expires_at)
                        .limit(limit)
                        .with_for_update(skip_locked=True)
                    )
                ).all()
            )
            if ids:
                await session.execute(
                    update(Notification)
                    .where(Notification.id.in_(ids), _expirable(now))
                    .values(status=NotificationStatus.EXPIRED.value, next_attempt_at=None)
                    .execution_options(synchronize_session=False)
                )
                metrics.NOTIFICATIONS.labels("outbox", "expired", "").inc(len(ids))
                events.append(session, topics.NOTIFICATIONS, "NotificationsExpired", {"ids": ids})
            # A message made moot while in flight that is open again: its sender died mid-flight (lease
            # over), or a late provider status put it back in the queue. No claim takes it: end it.
            abandoned = await session.execute(
                update(Notification)
                .where(
                    Notification.cancel_reason.is_not(None),
                    or_(
                        Notification.status.in_(UNSENT_STATUSES),
                        (Notification.status == NotificationStatus.SENDING.value)
                        & (Notification.next_attempt_at <= now),
                    ),
                )
                .values(status=NotificationStatus.CANCELLED.value, next_attempt_at=None)
                .execution_options(synchronize_session=False)
            )
            forgotten = self._slots_forgotten_at
            if forgotten is None or now - forgotten >= timedelta(seconds=FORGET_SLOTS_EVERY_S):
                self._slots_forgotten_at = now
                await pacing.forget_old_slots(session, now)
            return len(ids) + (abandoned.rowcount or 0)

    async def oldest_due(self, session: AsyncSession, now: datetime) -> datetime | None:
        """The earliest ``expires_at`` not yet applied (the sweeper's lag for this deadline)."""
        return await session.scalar(select(func.min(Notification.expires_at)).where(_expirable(now)))
