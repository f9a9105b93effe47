"""The delivery worker's claim: the due outbox rows one lane takes now, under a lease (seed 004; issues
3 and 7).

One transaction moves due rows (PENDING, FAILED whose retry is due, or SENDING whose lease ran out) to
SENDING with ``next_attempt_at = now + lease_s`` (UTC, seconds) and ``attempts + 1`` (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL), in ``priority`` order then ``next_attempt_at``; at most one message per paced
phone whose slot is free (the slot is taken here, for the whole flight); each lead carries the open rows
of its category that the category's *coalescer* merges into it. Rows past ``expires_at`` or made moot
(``cancel_reason``) are never claimed.

The lease: only its holder records an outcome (``status = SENDING AND attempts = <ours>``); a row claimed
again after its lease ran out has more attempts, so a late record of the old holder changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from limits import parse
from sqlalchemy import ColumnElement, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import Database
from dispatchd.notifications import pacing
from dispatchd.notifications.channels.base import OutboundMessage
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus
from dispatchd.notifications.outbox import UNSENT_STATUSES, Coalescer, Combined

if TYPE_CHECKING:
    from dispatchd.notifications.delivery import Lane


@dataclass(frozen=True)
class Member:
    """One outbox row inside a claimed message, with what recording its outcome needs (``attempts`` is
    the lease: the row's attempts once claimed; ``expires_at`` UTC or None)."""

    id: str
    attempts: int
    expires_at: datetime | None
    body: str
    payload: dict[str, Any] | None


@dataclass(frozen=True)
class Claimed:
    """One message to send (the lead's id, recipient and category; a coalesced body when it carries
    several rows) and the rows it carries."""

    message: OutboundMessage
    members: tuple[Member, ...]


def due(now: datetime) -> ColumnElement[bool]:
    """Rows a claim may take now: open, due, not expired, not made moot while in flight."""
    return and_(
        Notification.status.in_([s.value for s in OPEN_STATUSES]),
        Notification.next_attempt_at <= now,
        or_(Notification.expires_at.is_(None), Notification.expires_at > now),
        Notification.cancel_reason.is_(None),
    )


def current_lease(statement, member: Member):
    """Only the holder of the current lease may record (a re-claimed row has more attempts)."""
    return statement.where(
        Notification.id == member.id,
        Notification.status == NotificationStatus.SENDING.value,
        Notification.attempts == member.attempts,
    )


_table = Notification.__table__
#: :func:`current_lease` for many sent rows at once (executemany): parameters ``b_id``, ``b_attempts``,
#: ``b_sent_at``, ``b_wamid`` (the provider's message id) and ``b_carried_by``
RECORD_SENT = (
    _table.update()
    .where(
        _table.c.id == bindparam("b_id"),
        _table.c.status == NotificationStatus.SENDING.value,
        _table.c.attempts == bindparam("b_attempts"),
    )
    .values(
        status=NotificationStatus.SENT.value,
        sent_at=bindparam("b_sent_at"),
        next_attempt_at=None,
        provider_message_id=bindparam("b_wamid"),
        carried_by=bindparam("b_carried_by"),
    )
)


def outbound(row: Notification) -> OutboundMessage:
    """The channel's view of one outbox row (its template, if any, comes from ``payload["template"]``)."""
    payload = dict(row.payload) if row.payload else None
    return OutboundMessage(
        row.id, row.recipient, row.category, row.body, payload, template=(payload or {}).get("template")
    )


def due_query(lane: Lane, now: datetime, recipient_interval_s: float, *columns):
    """``SELECT`` of the lane's rows a claim may take now (of ``columns``, default whole rows), leaving out
    paced phones whose slot is taken when pacing is on."""
    query = select(*(columns or (Notification,))).where(due(now), lane.where)
    if recipient_interval_s:
        query = query.where(~pacing.held(now))
    return query


async def claim(
    db: Database,
    lane: Lane,
    limit: int,
    *,
    lease_s: float,
    recipient_interval_s: float,
    coalescers: Mapping[str, Coalescer],
) -> list[Claimed]:
    """Take up to ``limit`` messages for ``lane``: by priority, one per paced phone whose slot is free
    (the slot is taken here for ``max(lease_s, recipient_interval_s)`` seconds), each with the open rows
    its coalescer merges into it; every claim counts against the lane's rate."""
    # At a peak most wake-ups find every due phone paced: a read (which never waits for SQLite's
    # single writer) tells so without taking a write transaction.
    async with db.read() as session:
        probe = due_query(lane, session.info["now"], recipient_interval_s, Notification.id).limit(1)
        if await session.scalar(probe) is None:
            return []
    async with db.transaction() as session:
        now: datetime = session.info["now"]
        found = await leads(session, lane, now, limit, recipient_interval_s)
        if recipient_interval_s and found:
            # the slot is held for the whole flight; the record moves it to the answer + interval
            free = await pacing.take_slots(
                session,
                (row.recipient for row in found),
                now,
                max(lease_s, recipient_interval_s),
            )
            found = [row for row in found if not pacing.is_paced(row.recipient) or row.recipient in free]
        claimed = [
            start(lane, group, combined, now, lease_s)
            for group, combined in await groups(session, found, now, coalescers)
        ]
        if claimed and lane.rate:
            for _ in claimed:
                await lane.limiter.hit(parse(lane.rate), lane.channel.name)
        return claimed


async def leads(
    session: AsyncSession, lane: Lane, now: datetime, limit: int, recipient_interval_s: float
) -> list[Notification]:
    """The first ``limit`` due rows in priority order, at most one per paced phone, leaving out phones
    whose slot is taken (so the head of the queue always moves)."""
    query = (
        due_query(lane, now, recipient_interval_s)
        .order_by(Notification.priority, Notification.next_attempt_at, Notification.id)
        .limit(limit * 4 if recipient_interval_s else limit)
        .with_for_update(skip_locked=True)
    )
    rows = (await session.scalars(query)).all()
    if not recipient_interval_s:
        return list(rows)
    found: list[Notification] = []
    phones: set[str] = set()
    for row in rows:
        if pacing.is_paced(row.recipient):
            if row.recipient in phones:
                continue  # one message per phone per slot; the next one waits for the next slot
            phones.add(row.recipient)
        found.append(row)
        if len(found) == limit:
            break
    return found


async def groups(
    session: AsyncSession,
    lead_rows: list[Notification],
    now: datetime,
    coalescers: Mapping[str, Coalescer],
) -> list[tuple[list[Notification], Combined | None]]:
    """Each lead with the rows sent along with it: the recipient's other open rows of the lead's
    category, when that category has a coalescer and more than one row is open."""
    mergeable = [
        row for row in lead_rows if row.category in coalescers and not (row.payload or {}).get("template")
    ]
    siblings: dict[tuple[str, str], list[Notification]] = {}
    if mergeable:
        query = (
            select(Notification)
            .where(
                Notification.recipient.in_(sorted({row.recipient for row in mergeable})),
                Notification.category.in_(sorted({row.category for row in mergeable})),
                Notification.status.in_(UNSENT_STATUSES),
                Notification.cancel_reason.is_(None),
                Notification.id.not_in([row.id for row in lead_rows]),
                or_(Notification.expires_at.is_(None), Notification.expires_at > now),
            )
            .order_by(Notification.created_at, Notification.id)
            .with_for_update(skip_locked=True)
        )
        for row in (await session.scalars(query)).all():
            if not (row.payload or {}).get("template"):
                siblings.setdefault((row.recipient, row.category), []).append(row)
    result: list[tuple[list[Notification], Combined | None]] = []
    for lead in lead_rows:
        others = siblings.pop((lead.recipient, lead.category), []) if lead in mergeable else []
        if not others:
            result.append(([lead], None))
            continue
        rows = {row.id: row for row in [lead, *others]}
        combined = coalescers[lead.category]([outbound(row) for row in rows.values()])
        result.append(([rows[row_id] for row_id in combined.ids], combined))
    return result


def start(
    lane: Lane, group: list[Notification], combined: Combined | None, now: datetime, lease_s: float
) -> Claimed:
    """Move the group's rows to SENDING under one lease of ``lease_s`` seconds; return what to send."""
    members = []
    for row in group:
        row.status = NotificationStatus.SENDING.value
        row.attempts += 1
        row.channel = lane.channel.name
        row.next_attempt_at = now + timedelta(seconds=lease_s)
        members.append(
            Member(row.id, row.attempts, row.expires_at, row.body, dict(row.payload) if row.payload else None)
        )
    message = outbound(group[0])
    if combined is not None:
        message = OutboundMessage(
            message.id, message.recipient, message.category, combined.body, combined.payload
        )
    return Claimed(message, tuple(members))
