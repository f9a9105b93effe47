"""The append-only event log (DESIGN.md, idea 4).

Every state change appends ``(id, topic, type, data, created_at)`` in the transaction that makes the
change; ``id`` is strictly increasing and is what ``GET /v1/events?after=`` and SSE ``Last-Event-ID``
resume from.

Outbox ordering on PostgreSQL: a sequence value can commit out of order (tx A takes 41, tx B takes 42
and commits first; a reader at ``id > 40`` sees 42, moves on, and never sees 41). We make id order
equal commit order: events are buffered during the unit of work and inserted *last*, after
``pg_advisory_xact_lock(EVENT_LOG_LOCK)``, which is held until commit. So a transaction takes its ids
only after every earlier event-writing transaction has committed, and a reader can never see a gap
that later fills. The cost is that event-writing commits are serialised for the time of one insert and
one commit; hot rows (a booking, a resource) serialise writers anyway. SQLite has a single writer, so
the order holds there by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core import bulk
from dispatchd.core.db import Base
from dispatchd.core.topics import is_pattern
from dispatchd.core.types import BigIntPK, UTCDateTime

EVENT_LOG_LOCK = 0x6469737061746368  # "dispatch"
#: PostgreSQL ``NOTIFY`` channel told at each commit that wrote events or outbox messages (the realtime
#: hubs and the delivery of `dispatchd worker` processes listen)
NOTIFY_CHANNEL = "dispatchd_events"
_PENDING = "pending_events"
#: From this many events in one unit of work (a broadcast's ``OfferSent``), :func:`flush` writes them
#: through :func:`dispatchd.core.bulk.insert_many` (COPY / executemany) instead of a Core insert.
BULK_MIN_EVENTS = 100
_WAKE = "wake_listeners"


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_events_topic_id", "topic", "id"),)


@dataclass(frozen=True)
class EventRecord:
    id: int
    topic: str
    type: str
    data: dict[str, Any]
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "type": self.type,
            "data": self.data,
            "created_at": self.created_at.isoformat(),
        }


def append(session: AsyncSession, topic: str, type_: str, data: dict[str, Any]) -> None:
    """Record one event in the current unit of work; it is written at commit (see module doc).

    ``topic`` is e.g. ``"booking:bkg_…"`` or ``"driver:drv_…"``; ``data`` must be JSON-serialisable.
    """
    session.info.setdefault(_PENDING, []).append(
        {"topic": topic, "type": type_, "data": data, "created_at": session.info["now"]}
    )


def wake_listeners(session: AsyncSession) -> None:
    """Have the current unit of work ``NOTIFY`` :data:`NOTIFY_CHANNEL` at commit on PostgreSQL even if it
    writes no event (one more round trip then): the outbox asks it, so that the delivery loop of a
    `dispatchd worker` process, which listens there, claims a new message at once. Nothing on SQLite."""
    session.info[_WAKE] = True


async def flush(session: AsyncSession) -> int:
    """Insert the buffered events, serialised on PostgreSQL; return how many were written."""
    pending = session.info.pop(_PENDING, None)
    wake = session.info.pop(_WAKE, False)
    if not pending:
        if wake and session.bind.dialect.name == "postgresql":
            await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
        return 0
    if session.bind.dialect.name == "postgresql":
        # One round trip: the lock, and a NOTIFY delivered at commit (once per transaction, never on
        # rollback) to every instance's realtime hub.
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:key), pg_notify(:channel, '')"),
            {"key": EVENT_LOG_LOCK, "channel": NOTIFY_CHANNEL},
        )
    if len(pending) >= BULK_MIN_EVENTS:  # a broadcast: COPY on PostgreSQL, one executemany on SQLite
        created_at = pending[0]["created_at"]
        if all(event["created_at"] == created_at for event in pending):
            rows = [(event["topic"], event["type"], event["data"]) for event in pending]
            await bulk.insert_many(
                session, Event.__table__, ("topic", "type", "data"), rows, shared={"created_at": created_at}
            )
        else:
            rows = [(e["topic"], e["type"], e["data"], e["created_at"]) for e in pending]
            await bulk.insert_many(session, Event.__table__, ("topic", "type", "data", "created_at"), rows)
    else:
        await session.execute(Event.__table__.insert(), pending)
    session.info["events_written"] = len(pending)
    return len(pending)


async def read(
    session: AsyncSession,
    *,
    after_id: int = 0,
    topics: list[str] | None = None,
    limit: int = 100,
    up_to: int | None = None,
) -> list[EventRecord]:
    """Events with ``id > after_id`` (and ``id <= up_to`` when given; optionally only these topics, or
    patterns such as ``booking:*``: see :mod:`dispatchd.core.topics`), oldest first, at most ``limit``."""
    query = select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
    if up_to is not None:
        query = query.where(Event.id <= up_to)
    if topics:
        exact = [name for name in topics if not is_pattern(name)]
        conditions = [Event.topic.in_(exact)] if exact else []
        for pattern in topics:
            if pattern == "*":
                conditions = []
                break
            if is_pattern(pattern):
                prefix = pattern.rstrip("*").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                conditions.append(Event.topic.like(prefix + "%", escape="\\"))
        if conditions:
            query = query.where(or_(*conditions))
    rows = (await session.scalars(query)).all()
    return [EventRecord(row.id, row.topic, row.type, row.data, row.created_at) for row in rows]


async def last_id(session: AsyncSession) -> int:
    """The highest event id written so far (0 for an empty log)."""
    return await session.scalar(select(func.coalesce(func.max(Event.id), 0))) or 0
