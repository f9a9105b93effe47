"""Per-recipient pacing: at most one message per phone every ``interval_s`` seconds.

Meta allows about one message every 6 s to the same WhatsApp user (the pair rate limit, error 131056:
Cloud API "Throughput" and "Error codes" pages). A phone's next free slot is a row of
``recipient_pacing``; a claim takes slots with one conditional upsert (DESIGN.md, idea 2), so two
workers, in one process or several, never both send to a phone within the interval. A message whose
phone is held waits without blocking anyone: the claim query leaves such phones out.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.notifications.models import Notification, RecipientPacing

#: Slots this far in the past are forgotten (they no longer hold anyone).
FORGET_AFTER_S = 3600.0


def is_paced(recipient: str) -> bool:
    """Only phones (E.164, ``+`` first) are paced: e-mail and the ``admin`` log placeholder are not."""
    return recipient.startswith("+")


def held(now: datetime) -> ColumnElement[bool]:
    """True for a notification whose recipient's next slot is still ahead of ``now``."""
    return exists(
        select(RecipientPacing.recipient).where(
            RecipientPacing.recipient == Notification.recipient, RecipientPacing.next_slot_at > now
        )
    )


async def take_slots(
    session: AsyncSession, recipients: Iterable[str], now: datetime, hold_s: float
) -> set[str]:
    """Take the current slot of each phone that is free at ``now``; return the phones taken.

    A taken phone is held until ``now + hold_s`` (the delivery lease: the send is in flight), then
    :func:`set_next_slots` moves it to the provider's answer + the interval. One statement, phones in a
    fixed order (PostgreSQL waits on a slot another transaction is taking, then sees it taken).
    """
    phones = sorted({r for r in recipients if is_paced(r)})
    if not phones:
        return set()
    dialect = session.bind.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    following = now + timedelta(seconds=hold_s)
    statement = insert(RecipientPacing).values(
        [{"recipient": phone, "next_slot_at": following} for phone in phones]
    )
    statement = statement.on_conflict_do_update(
        index_elements=[RecipientPacing.recipient],
        set_={"next_slot_at": statement.excluded.next_slot_at},
        where=RecipientPacing.next_slot_at <= now,
    ).returning(RecipientPacing.recipient)
    taken = await session.execute(statement)
    return set(taken.scalars().all())


async def set_next_slots(session: AsyncSession, recipients: Iterable[str], at: datetime) -> None:
    """Set the next slot of these phones to ``at``: ``answer + interval`` after a send (Meta counts from its
    acceptance, which comes after our claim, however long the call took), or now when nothing was sent.

    The rows are locked first in phone order, as :func:`take_slots` takes them, so a claim and a record
    never deadlock on PostgreSQL."""
    phones = sorted({r for r in recipients if is_paced(r)})
    if not phones:
        return
    await session.execute(
        select(RecipientPacing.recipient)
        .where(RecipientPacing.recipient.in_(phones))
        .order_by(RecipientPacing.recipient)
        .with_for_update()
    )
    await session.execute(
        update(RecipientPacing).where(RecipientPacing.recipient.in_(phones)).values(next_slot_at=at)
    )


async def forget_old_slots(session: AsyncSession, now: datetime) -> int:
    """Delete slots that ended more than :data:`FORGET_AFTER_S` ago; return how many."""
    result = await session.execute(
        delete(RecipientPacing).where(RecipientPacing.next_slot_at < now - timedelta(seconds=FORGET_AFTER_S))
    )
    return result.rowcount or 0


async def count_held(session: AsyncSession, now: datetime, due: ColumnElement[bool]) -> int:
    """How many rows matching ``due`` wait only because their phone's slot is taken."""
    return int(await session.scalar(select(func.count()).where(and_(due, held(now)))) or 0)
