"""The matching deadlines the sweeper runs, in this order each tick (seed 000 §4):

1. ``offer_expiry``: ``booking_offers.expires_at`` (30 s) → TIMEOUT;
2. ``search_expiry``: ``bookings.search_deadline_at`` (5 min) → TIMEOUT, customer and admins told;
3. ``escalation``: ``bookings.next_wave_at`` → a new wave when every offer is resolved.

Search expiry runs before escalation so that a search past its deadline never gets another wave.

Each deadline's "due at ``now``" is one predicate (:func:`offer_due`, :func:`search_due`,
:func:`wave_due`), used both by the claim (``FOR UPDATE SKIP LOCKED``, so several instances share the
work) and by the lag report (``oldest_due``, for ``/ready``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.sweeper import Deadline
from dispatchd.matching import broadcast, lifecycle
from dispatchd.matching.lookups import now
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus
from dispatchd.matching.offers import expire_offers
from dispatchd.matching.types import MatchingConfig
from dispatchd.notifications import outbox

if TYPE_CHECKING:
    from dispatchd.matching.service import MatchingService

#: Searches escalated per claim at most: a wave writes one offer per available driver.
WAVES_PER_BATCH_MAX = 50


def offer_due(at: datetime) -> ColumnElement[bool]:
    """An open offer whose ``expires_at`` (UTC) is at or before ``at``."""
    return and_(BookingOffer.response.is_(None), BookingOffer.expires_at <= at)


def search_due(at: datetime) -> ColumnElement[bool]:
    """A SEARCHING booking whose ``search_deadline_at`` (UTC) is at or before ``at``."""
    return and_(Booking.status == BookingStatus.SEARCHING.value, Booking.search_deadline_at <= at)


def wave_due(at: datetime) -> ColumnElement[bool]:
    """A SEARCHING booking whose ``next_wave_at`` (UTC) is at or before ``at`` and whose search has not
    ended (past its deadline, :func:`search_due` handles it)."""
    return and_(
        Booking.status == BookingStatus.SEARCHING.value,
        Booking.next_wave_at <= at,
        Booking.search_deadline_at > at,
    )


async def expire_due_offers(session: AsyncSession, limit: int) -> int:
    """Offers due (:func:`offer_due`), at most ``limit``, oldest first → TIMEOUT; how many were."""
    due = await session.scalars(
        select(BookingOffer.id)
        .where(offer_due(now(session)))
        .order_by(BookingOffer.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True, key_share=True)
    )
    return await expire_offers(session, list(due.all()))


async def expire_due_searches(session: AsyncSession, config: MatchingConfig, limit: int) -> int:
    """Searches due (:func:`search_due`), at most ``limit``, oldest first → TIMEOUT
    (:func:`lifecycle.time_out`); how many were."""
    due = list(
        (
            await session.scalars(
                select(Booking)
                .where(search_due(now(session)))
                .order_by(Booking.search_deadline_at)
                .limit(limit)
                .with_for_update(skip_locked=True, key_share=True)
            )
        ).all()
    )
    moot = [await lifecycle.time_out(session, config, booking) for booking in due]
    # one call: every moot row of the batch locked in one order (no deadlock with an accept)
    await outbox.cancel(session, moot)
    return len(due)


async def run_due_waves(session: AsyncSession, config: MatchingConfig, limit: int) -> int:
    """Searches whose wave is due (:func:`wave_due`), at most ``min(limit, 50)``, oldest first, each
    escalated (:func:`broadcast.escalate`); how many were looked at."""
    due = list(
        (
            await session.scalars(
                select(Booking)
                .where(wave_due(now(session)))
                .order_by(Booking.next_wave_at)
                .limit(min(limit, WAVES_PER_BATCH_MAX))
                .with_for_update(skip_locked=True, key_share=True)
            )
        ).all()
    )
    for booking in due:
        await broadcast.escalate(session, config, booking)
    return len(due)


OldestDue = Callable[[AsyncSession, datetime], Awaitable[datetime | None]]


def _oldest(column: Any, due: Callable[[datetime], ColumnElement[bool]]) -> OldestDue:
    async def oldest_due(session: AsyncSession, at: datetime) -> datetime | None:
        return await session.scalar(select(func.min(column)).where(due(at)))

    return oldest_due


#: ``oldest_due`` of each deadline: when the oldest row due at ``now`` fell due (UTC), or None.
oldest_offer = _oldest(BookingOffer.expires_at, offer_due)
oldest_search = _oldest(Booking.search_deadline_at, search_due)
oldest_wave = _oldest(Booking.next_wave_at, wave_due)


def deadlines(service: MatchingService) -> list[Deadline]:
    """The three matching deadlines, in the order the sweeper must run them: ``offer_expiry``,
    ``search_expiry``, ``escalation``. Register each with :meth:`Sweeper.register`."""
    return [
        Deadline("offer_expiry", service.expire_due_offers, oldest_offer),
        Deadline("search_expiry", service.expire_due_searches, oldest_search),
        Deadline("escalation", service.run_due_waves, oldest_wave),
    ]
