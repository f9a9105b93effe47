"""The matching deadlines the sweeper runs, in this order each tick (seed 000 §4):

1. ``offer_expiry``: ``booking_offers.expires_at`` (30 s) → TIMEOUT;
2. ``search_expiry``: ``bookings.search_deadline_at`` (5 min) → TIMEOUT, customer and admins told;
3. ``escalation``: ``bookings.next_wave_at`` → a new wave when every offer is resolved.

Search expiry runs before escalation so that a search past its deadline never gets another wave.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.sweeper import Deadline, Sweeper
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus
from dispatchd.matching.service import MatchingService


async def _oldest_offer(session: AsyncSession, now: datetime) -> datetime | None:
    return await session.scalar(
        select(func.min(BookingOffer.expires_at)).where(
            BookingOffer.response.is_(None), BookingOffer.expires_at <= now
        )
    )


async def _oldest_search(session: AsyncSession, now: datetime) -> datetime | None:
    return await session.scalar(
        select(func.min(Booking.search_deadline_at)).where(
            Booking.status == BookingStatus.SEARCHING.value, Booking.search_deadline_at <= now
        )
    )


async def _oldest_wave(session: AsyncSession, now: datetime) -> datetime | None:
    return await session.scalar(
        select(func.min(Booking.next_wave_at)).where(
            Booking.status == BookingStatus.SEARCHING.value,
            Booking.next_wave_at <= now,
            Booking.search_deadline_at > now,
        )
    )


def register(sweeper: Sweeper, service: MatchingService) -> None:
    """Register the three matching deadlines on ``sweeper``."""
    sweeper.register(Deadline("offer_expiry", service.expire_due_offers, _oldest_offer))
    sweeper.register(Deadline("search_expiry", service.expire_due_searches, _oldest_search))
    sweeper.register(Deadline("escalation", service.run_due_waves, _oldest_wave))
