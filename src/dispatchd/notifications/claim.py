"""The delivery worker's claim: the due outbox rows one lane takes now, under a lease (seed 004; issues
3, 7 and 11).

One transaction moves due rows (PENDING, FAILED whose retry is due, or SENDING whose lease ran out) to
SENDING with ``next_attempt_at = now + lease_s`` (UTC, seconds) and ``attempts + 1`` (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL), in ``priority`` order then ``next_attempt_at``; at most one message per paced
phone whose slot is free (the slot is taken here, for the whole flight); each lead carries the open rows
of its category that the category's *coalescer* merges into it. Rows past ``expires_at`` or made moot
(``cancel_reason``) are never claimed.

Batched (issue 11): the whole batch is one ``SELECT … FOR UPDATE SKIP LOCKED`` of the columns a send needs
(Core rows, no ORM objects; each row says whether its recipient has other open rows of its category, so the
coalescing query runs only when there is something to merge) and one ``UPDATE … WHERE id IN (…)`` for
every row claimed. Pacing and coalescing decide in Python which locked rows to take, so the two cannot be
one ``UPDATE … WHERE id IN (SELECT …)``; on PostgreSQL no read runs before the transaction (on SQLite a
read still checks that something is due before taking the single writer's lock).

The lease: only its holder records an outcome (``status = SENDING AND attempts = <ours>``); a row claimed
again after its lease ran out has more attempts, so a late record of the old holder changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from limits import parse
from sqlalchemy import ColumnElement, Integer, Row, and_, bindparam, exists, false, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from dispatchd.core.db import Database
from dispatchd.core.types import UTCDateTime
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


def outbound(row: Row) -> OutboundMessage:
    """The channel's view of one outbox row (of :data:`COLUMNS`; its template, if any, comes from
    ``payload["template"]``)."""
    payload = dict(row.payload) if row.payload else None
    return OutboundMessage(
        row.id, row.recipient, row.category, row.body, payload, template=(payload or {}).get("template")
    )


#: what a send and its record need of a row (the claim reads nothing else)
COLUMNS = (
    Notification.id,
    Notification.recipient,
    Notification.category,
    Notification.body,
    Notification.payload,
    Notification.attempts,
    Notification.expires_at,
)

_other = aliased(Notification)


def has_siblings(now: datetime, categories: list[str]) -> ColumnElement[bool]:
    """True for a row of a coalesced category whose recipient has another open row of that category (the
    coalescing query is needed only then)."""
    if not categories:
        return false().label("has_siblings")
    return and_(
        Notification.category.in_(categories),
        exists(
            select(_other.id).where(
                _other.recipient == Notification.recipient,
                _other.category == Notification.category,
                _other.status.in_(UNSENT_STATUSES),
                _other.id != Notification.id,
                _other.cancel_reason.is_(None),
                or_(_other.expires_at.is_(None), _other.expires_at > now),
            )
        ),
    ).label("has_siblings")


def due_query(lane: Lane, now: datetime, recipient_interval_s: float, *columns):
    """``SELECT`` of the lane's rows a claim may take now (of ``columns``, default :data:`COLUMNS`), leaving
    out paced phones whose slot is taken when pacing is on."""
    query = select(*(columns or COLUMNS)).where(due(now), lane.where)
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
    its coalescer merges into it; every claim counts against the lane's rate. Statements: one ``SELECT …
    FOR UPDATE SKIP LOCKED``, one ``UPDATE`` of every row claimed, plus the pacing upsert when pacing is on
    and the coalescing ``SELECT`` when a lead has rows to merge."""
    if db.is_sqlite:
        # At a peak most wake-ups find every due phone paced: a read (which never waits for SQLite's
        # single writer) tells so without taking a write transaction.
        async with db.read() as session:
            probe = due_query(lane, session.info["now"], recipient_interval_s, Notification.id).limit(1)
            if await session.scalar(probe) is None:
                return []
    async with db.transaction() as session:
        now: datetime = session.info["now"]
        found = await leads(session, lane, now, limit, recipient_interval_s, coalescers)
        if recipient_interval_s and found:
            # the slot is held for the whole flight; the record moves it to the answer + interval
            free = await pacing.take_slots(
                session,
                (row.recipient for row in found),
                now,
                max(lease_s, recipient_interval_s),
            )
            found = [row for row in found if not pacing.is_paced(row.recipient) or row.recipient in free]
        if not found:
            return []
        grouped = await groups(session, found, now, coalescers)
        claimed = await start(session, lane, grouped, now, lease_s)
        if claimed and lane.rate:
            for _ in claimed:
                await lane.limiter.hit(parse(lane.rate), lane.channel.name)
        return claimed


_NOW = bindparam("now", type_=UTCDateTime())


def _leads_query(lane: Lane, paced: bool, categories: tuple[str, ...]):
    """The lead ``SELECT`` of :func:`leads`, built once per lane and shape (parameters ``now`` and
    ``limit``): building it costs more Python than running it."""
    cache = lane.__dict__.setdefault("_lead_queries", {})
    key = (paced, categories)
    if key not in cache:
        cache[key] = (
            due_query(lane, _NOW, 1.0 if paced else 0.0, *COLUMNS, has_siblings(_NOW, list(categories)))
            .order_by(Notification.priority, Notification.next_attempt_at, Notification.id)
            .limit(bindparam("limit", type_=Integer))
            .with_for_update(skip_locked=True, of=Notification)
        )
    return cache[key]


async def leads(
    session: AsyncSession,
    lane: Lane,
    now: datetime,
    limit: int,
    recipient_interval_s: float,
    coalescers: Mapping[str, Coalescer] | None = None,
) -> list[Row]:
    """The first ``limit`` due rows in priority order (:data:`COLUMNS` and ``has_siblings``), at most one
    per paced phone, leaving out phones whose slot is taken (so the head of the queue always moves)."""
    query = _leads_query(lane, bool(recipient_interval_s), tuple(sorted(coalescers or ())))
    parameters = {"now": now, "limit": limit * 4 if recipient_interval_s else limit}
    rows = (await session.execute(query, parameters)).all()
    if not recipient_interval_s:
        return list(rows)
    found: list[Row] = []
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


def _mergeable(row: Row, coalescers: Mapping[str, Coalescer]) -> bool:
    return row.category in coalescers and not (row.payload or {}).get("template")


async def groups(
    session: AsyncSession,
    lead_rows: list[Row],
    now: datetime,
    coalescers: Mapping[str, Coalescer],
) -> list[tuple[list[Row], Combined | None]]:
    """Each lead with the rows sent along with it: the recipient's other open rows of the lead's
    category, when that category has a coalescer and more than one row is open (one ``SELECT … FOR
    UPDATE SKIP LOCKED``, only when a lead's ``has_siblings`` says there are some)."""
    mergeable = [
        row for row in lead_rows if _mergeable(row, coalescers) and getattr(row, "has_siblings", True)
    ]
    siblings: dict[tuple[str, str], list[Row]] = {}
    if mergeable:
        query = (
            select(*COLUMNS)
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
        for row in (await session.execute(query)).all():
            if not (row.payload or {}).get("template"):
                siblings.setdefault((row.recipient, row.category), []).append(row)
    merging = {row.id for row in mergeable}
    result: list[tuple[list[Row], Combined | None]] = []
    for lead in lead_rows:
        others = siblings.pop((lead.recipient, lead.category), []) if lead.id in merging else []
        if not others:
            result.append(([lead], None))
            continue
        rows = {row.id: row for row in [lead, *others]}
        combined = coalescers[lead.category]([outbound(row) for row in rows.values()])
        result.append(([rows[row_id] for row_id in combined.ids], combined))
    return result


async def start(
    session: AsyncSession,
    lane: Lane,
    grouped: list[tuple[list[Row], Combined | None]],
    now: datetime,
    lease_s: float,
) -> list[Claimed]:
    """Move every grouped row to SENDING under one lease of ``lease_s`` seconds, in one ``UPDATE``; return
    what to send. The rows are locked by this transaction (SKIP LOCKED claim; SQLite's single writer), so
    their attempts are the ones read, plus one."""
    claimed: list[Claimed] = []
    ids: list[str] = []
    for group, combined in grouped:
        members = tuple(
            Member(
                row.id, row.attempts + 1, row.expires_at, row.body, dict(row.payload) if row.payload else None
            )
            for row in group
        )
        ids += [member.id for member in members]
        message = outbound(group[0])
        if combined is not None:
            message = OutboundMessage(
                message.id, message.recipient, message.category, combined.body, combined.payload
            )
        claimed.append(Claimed(message, members))
    if ids:
        await session.execute(
            _table.update()
            .where(_table.c.id.in_(bindparam("ids", expanding=True)))
            .values(
                status=NotificationStatus.SENDING.value,
                attempts=_table.c.attempts + 1,
                channel=lane.channel.name,
                next_attempt_at=now + timedelta(seconds=lease_s),
            ),
            {"ids": ids},
        )
    return claimed
