"""Operator actions on the outbox, shared by the API and the CLI (seed 004 §3 "Commande Retry")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.exc import IntegrityError

from dispatchd.core import events, metrics, topics
from dispatchd.core.db import Database
from dispatchd.core.errors import InvalidState
from dispatchd.core.rows import get_or_404
from dispatchd.notifications import outbox, pacing
from dispatchd.notifications.alerts import failed_attempts, failed_attempts_by_class, sent_since
from dispatchd.notifications.breaker import CircuitBreaker
from dispatchd.notifications.models import OPEN_STATUSES, AlertState, Notification, NotificationStatus
from dispatchd.notifications.outbox import Message
from dispatchd.notifications.policy import Priority

RETRYABLE = (
    NotificationStatus.FAILED.value,
    NotificationStatus.FAILED_PERMANENT.value,
    NotificationStatus.EXPIRED.value,
    NotificationStatus.CANCELLED.value,
)


async def enqueue_one(db: Database, message: Message) -> tuple[Notification, bool]:
    """Write one message; with ``message.idempotency_key`` a repeat returns the first row.

    Returns ``(row, created)``: ``created`` is False for a repeat (the caller compares the bodies).
    """
    try:
        async with db.transaction() as session:
            [notification_id] = await outbox.enqueue(session, [message])
            row = await session.get(Notification, notification_id)
            return row, True
    except IntegrityError:
        async with db.read() as session:
            row = await session.scalar(
                select(Notification).where(Notification.idempotency_key == message.idempotency_key)
            )
        if row is None:
            raise
        return row, False


async def retry_one(db: Database, notification_id: str) -> Notification:
    """Send a FAILED / FAILED_PERMANENT / EXPIRED / CANCELLED message again now, with a fresh attempt budget.

    Returns the row, PENDING and due now (UTC). Raises :class:`~dispatchd.core.errors.NotFound`
    ``NOTIFICATION_NOT_FOUND``, :class:`InvalidState` (pending, sending or already delivered)."""
    async with db.transaction() as session:
        row = await get_or_404(
            session, Notification, notification_id, code="NOTIFICATION_NOT_FOUND", what="notification"
        )
        if row.status not in RETRYABLE:
            raise InvalidState(
                f"notification {notification_id} is {row.status}; only failed ones are retried"
            )
        row.status = NotificationStatus.PENDING.value
        row.attempts = 0
        row.next_attempt_at = session.info["now"]
        row.cancel_reason = None  # an operator's choice overrides "moot"
        events.append(session, topics.NOTIFICATIONS, "NotificationRetried", {"id": row.id})
        return row


#: what an operator may cancel: messages not yet handed to the provider and not being handed now
CANCELLABLE = (NotificationStatus.PENDING.value, NotificationStatus.FAILED.value)
#: ``cancel_reason`` of a message an operator cancelled (the seed's ``annulee``)
CANCELLED_BY_OPERATOR = "cancelled by an operator"


async def cancel_one(db: Database, notification_id: str, *, by: str | None = None) -> Notification:
    """Cancel a PENDING or FAILED message (seed 004 §1, status ``annulee``): it is never sent.

    Returns the row, CANCELLED with ``cancel_reason`` "cancelled by an operator"; appends
    ``NotificationCancelled`` ``{"id", "by"}`` (``by``: the API key id) on the ``notifications`` topic.
    Raises :class:`~dispatchd.core.errors.NotFound` ``NOTIFICATION_NOT_FOUND``, :class:`InvalidState`
    (409 ``INVALID_STATE``) when it is SENDING (a worker holds it: it may already be at the provider), sent,
    delivered, read, or already ended (FAILED_PERMANENT, EXPIRED, CANCELLED). The row is locked, so a
    worker's claim either sees it CANCELLED or makes it SENDING first."""
    async with db.transaction() as session:
        row = await get_or_404(
            session,
            Notification,
            notification_id,
            code="NOTIFICATION_NOT_FOUND",
            what="notification",
            lock=True,
        )
        if row.status not in CANCELLABLE:
            raise InvalidState(
                f"notification {notification_id} is {row.status}; only PENDING or FAILED ones are cancelled"
            )
        row.status = NotificationStatus.CANCELLED.value
        row.cancel_reason = CANCELLED_BY_OPERATOR
        row.next_attempt_at = None
        events.append(session, topics.NOTIFICATIONS, "NotificationCancelled", {"id": row.id, "by": by})
        return row


async def replay(db: Database, since: datetime, *, permanent_only: bool = False) -> int:
    """Put every message that failed (FAILED, FAILED_PERMANENT; only the latter with ``permanent_only``)
    since ``since`` (UTC, on ``failed_at``) back in the queue, due now, attempts 0; return how many."""
    statuses = (
        [NotificationStatus.FAILED_PERMANENT.value]
        if permanent_only
        else [NotificationStatus.FAILED.value, NotificationStatus.FAILED_PERMANENT.value]
    )
    async with db.transaction() as session:
        result = await session.execute(
            update(Notification)
            .where(Notification.status.in_(statuses), Notification.failed_at >= since)
            .values(status=NotificationStatus.PENDING.value, attempts=0, next_attempt_at=session.info["now"])
        )
        if result.rowcount:
            events.append(
                session,
                topics.NOTIFICATIONS,
                "NotificationsReplayed",
                {"count": result.rowcount, "since": since.isoformat(), "permanent_only": permanent_only},
            )
        return result.rowcount


@dataclass(frozen=True)
class RetryCandidate:
    """One FAILED message :func:`retry_failed` found: its ``attempts`` so far, when its next attempt was
    due (UTC, before ``--now`` made it due now) and its last error."""

    id: str
    recipient: str
    category: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None


async def retry_failed(
    db: Database, *, limit: int = 100, max_retries: int = 10, dry_run: bool = False, now: bool = False
) -> list[RetryCandidate]:
    """The seed's ``retry_failed_notifications`` (seed 004 §3): FAILED (temporary) messages with fewer than
    ``max_retries`` attempts, oldest due first, at most ``limit``.

    By default the backoff is honoured: only the messages whose ``next_attempt_at`` has come are taken;
    they are already due, so they are left as they are and the delivery worker sends them at its next
    claim (the seed's "prêtes pour retry"). With ``now``, every FAILED message is taken and made due now,
    ignoring its backoff. ``dry_run`` only lists them. Rows are claimed ``FOR UPDATE SKIP LOCKED``."""
    async with db.transaction() as session:
        at = session.info["now"]
        query = select(Notification).where(
            Notification.status == NotificationStatus.FAILED.value,
            Notification.attempts < max_retries,
        )
        if not now:
            query = query.where(Notification.next_attempt_at <= at)
        rows = list(
            (
                await session.scalars(
                    query.order_by(Notification.next_attempt_at, Notification.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
        )
        found = [
            RetryCandidate(r.id, r.recipient, r.category, r.attempts, r.next_attempt_at, r.last_error)
            for r in rows
        ]
        if now and not dry_run:
            for row in rows:
                row.next_attempt_at = at
        return found


@dataclass(frozen=True)
class Backlog:
    """What waits in the outbox: open rows (PENDING / SENDING / FAILED), the ``created_at`` of the oldest,
    the ``created_at`` of the oldest due, unsent customer or admin message (priority ≤ NORMAL), and how
    many due rows wait only for their phone's pacing slot."""

    open: int
    oldest: datetime | None
    oldest_must_deliver: datetime | None
    held_by_pacing: int


async def backlog(db: Database) -> Backlog:
    """Read the :class:`Backlog` and refresh its Prometheus gauges (ages in seconds, 0 when none)."""
    async with db.read() as session:
        now = session.info["now"]
        open_ = Notification.status.in_([s.value for s in OPEN_STATUSES])
        count, oldest = (
            await session.execute(select(func.count(), func.min(Notification.created_at)).where(open_))
        ).one()
        due = and_(open_, Notification.next_attempt_at <= now)
        must = await session.scalar(
            select(func.min(Notification.created_at)).where(due, Notification.priority <= Priority.NORMAL)
        )
        held = await pacing.count_held(session, now, due)
    metrics.NOTIFICATION_BACKLOG.set(count)
    metrics.OLDEST_PENDING_AGE.set((now - oldest).total_seconds() if oldest else 0)
    metrics.OLDEST_MUST_DELIVER_AGE.set((now - must).total_seconds() if must else 0)
    metrics.HELD_BY_PACING.set(held)
    return Backlog(int(count), oldest, must, held)


async def health(db: Database, breakers: list[CircuitBreaker] | None = None) -> dict[str, Any]:
    """Outbox health: counts by status, backlog and its oldest message, the due messages by category (how
    many, and how long the oldest has waited, in s), how many wait only for their phone's pacing slot,
    last hour's outcomes, recent errors, alert cooldowns and (in a server) each channel's circuit.

    Monitoring statistics (seed 004 "Monitoring", issue 14): ``failed`` — rows FAILED (``temporary``) and
    FAILED_PERMANENT (``permanent``) now; ``last_24h`` — messages ``sent`` (by ``sent_at``), failed send
    ``failed_attempts`` (from the event log, as the alert rules count them), ``success_rate`` = sent /
    (sent + failed attempts) in [0, 1] (None without any) and ``failed_attempts_by_class`` (error class →
    attempts); ``last_hour.failed_attempts`` likewise. ``last_hour.failed`` counts rows whose last failure
    is in the hour."""
    async with db.read() as session:
        now = session.info["now"]
        hour_ago, day_ago = now - timedelta(hours=1), now - timedelta(hours=24)
        by_status = dict(
            (
                await session.execute(select(Notification.status, func.count()).group_by(Notification.status))
            ).all()
        )
        oldest = await session.scalar(
            select(func.min(Notification.created_at)).where(
                Notification.status.in_(["PENDING", "SENDING", "FAILED"])
            )
        )
        due = and_(
            Notification.status.in_([s.value for s in OPEN_STATUSES]), Notification.next_attempt_at <= now
        )
        due_by_category = (
            await session.execute(
                select(Notification.category, func.count(), func.min(Notification.created_at))
                .where(due)
                .group_by(Notification.category)
                .order_by(Notification.category)
            )
        ).all()
        held = await pacing.count_held(session, now, due)
        sent_1h = await session.scalar(select(func.count()).where(Notification.sent_at >= hour_ago))
        failed_1h = await session.scalar(select(func.count()).where(Notification.failed_at >= hour_ago))
        errors = (
            await session.execute(
                select(Notification.error_code, Notification.error_kind, func.count())
                .where(Notification.failed_at >= hour_ago, Notification.error_code.is_not(None))
                .group_by(Notification.error_code, Notification.error_kind)
                .order_by(func.count().desc())
                .limit(10)
            )
        ).all()
        alerts = (
            await session.scalars(select(AlertState).order_by(AlertState.last_fired_at.desc()).limit(10))
        ).all()
        attempts_failed_1h = await failed_attempts(session, hour_ago)
        attempts_failed_24h = await failed_attempts(session, day_ago)
        sent_24h = await sent_since(session, day_ago)
        by_class_24h = await failed_attempts_by_class(session, day_ago)
    outcomes = sent_1h + failed_1h
    attempts_24h = sent_24h + attempts_failed_24h
    return {
        "at": now,
        "by_status": by_status,
        "backlog": sum(by_status.get(s, 0) for s in ("PENDING", "SENDING", "FAILED")),
        "oldest_waiting_s": round((now - oldest).total_seconds(), 3) if oldest else None,
        "due_by_category": {
            category: {"due": count, "oldest_waiting_s": round((now - first).total_seconds(), 3)}
            for category, count, first in due_by_category
        },
        "held_by_pacing": held,
        "last_hour": {
            "sent": sent_1h,
            "failed": failed_1h,
            "failure_rate": round(failed_1h / outcomes, 4) if outcomes else None,
            "failed_attempts": attempts_failed_1h,
        },
        "failed": {
            "temporary": by_status.get(NotificationStatus.FAILED.value, 0),
            "permanent": by_status.get(NotificationStatus.FAILED_PERMANENT.value, 0),
        },
        "last_24h": {
            "sent": sent_24h,
            "failed_attempts": attempts_failed_24h,
            "success_rate": round(sent_24h / attempts_24h, 4) if attempts_24h else None,
            "failed_attempts_by_class": by_class_24h,
        },
        "errors_last_hour": [{"code": c, "kind": k, "count": n} for c, k, n in errors],
        "channels": [
            {"channel": b.channel, "circuit": b.state.value, "reason": b.reason, "open_until": b.open_until}
            for b in breakers or []
        ],
        "alerts": [{"rule": a.rule, "last_fired_at": a.last_fired_at, "detail": a.detail} for a in alerts],
    }
