"""Offer rows (``booking_offers``, the seed's BookingNotification, seed 000 §1.2): reading them, and the
statements that close open offers, shared by the answers, the lifecycle and the deadlines.

An open offer has ``response IS NULL``. Every closing statement is conditional on that and uses
RETURNING, so an offer closed meanwhile by someone else (the sweeper, a tap, a cancel) is never counted
twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, metrics, topics
from dispatchd.core.logging import get_logger
from dispatchd.matching.lookups import booking_or_404, now
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus, MatchingMetrics, OfferResponse

log = get_logger("dispatchd.matching")


async def list_offers(session: AsyncSession, booking_id: str) -> list[BookingOffer]:
    """Every offer of the booking, oldest first. Raises :class:`NotFound` (BOOKING_NOT_FOUND)."""
    await booking_or_404(session, booking_id)
    rows = await session.scalars(
        select(BookingOffer)
        .where(BookingOffer.booking_id == booking_id)
        .order_by(BookingOffer.sent_at, BookingOffer.id)
    )
    return list(rows.all())


async def open_offers_of(session: AsyncSession, driver_id: str) -> list[BookingOffer]:
    """The offers the driver can still answer: no response yet, not expired at the transaction's now
    (``expires_at`` > now, as :func:`dispatchd.matching.answers.respond` counts it), on a booking still
    SEARCHING; oldest first (``sent_at``, then id). An unknown driver has none."""
    rows = await session.scalars(
        select(BookingOffer)
        .join(Booking, Booking.id == BookingOffer.booking_id)
        .where(
            BookingOffer.driver_id == driver_id,
            BookingOffer.response.is_(None),
            BookingOffer.expires_at > now(session),
            Booking.status == BookingStatus.SEARCHING.value,
        )
        .order_by(BookingOffer.sent_at, BookingOffer.id)
    )
    return list(rows.all())


async def open_offer_count(session: AsyncSession, booking_id: str) -> int:
    """How many of the booking's offers are still open."""
    count = await session.scalar(
        select(func.count())
        .select_from(BookingOffer)
        .where(BookingOffer.booking_id == booking_id, BookingOffer.response.is_(None))
    )
    return int(count or 0)


async def close_offers(
    session: AsyncSession, booking_id: str, response: OfferResponse, *, except_offer: str | None = None
) -> list[str]:
    """Close the booking's open offers (but ``except_offer``) with ``response`` (TAKEN or CANCELLED);
    return the drivers whose offer this statement closed, sorted."""
    query = update(BookingOffer).where(BookingOffer.booking_id == booking_id, BookingOffer.response.is_(None))
    if except_offer:
        query = query.where(BookingOffer.id != except_offer)
    rows = await session.execute(
        query.values(response=response.value)
        .returning(BookingOffer.driver_id)
        .execution_options(synchronize_session=False)
    )
    closed = sorted(rows.scalars().all())
    if closed:
        metrics.OFFER_OUTCOMES.labels(response.value).inc(len(closed))
    return closed


async def expire_offers(session: AsyncSession, offer_ids: Sequence[str]) -> int:
    """Seed 000 §4 handleDriverTimeout for these offers: open → TIMEOUT, ``OfferTimedOut`` on each driver's
    topic, ``matching_metrics.total_timeouts`` per booking, and one "driver timeout" warning per offer
    (seed 000 "Logs structurés": ``booking_id``, ``driver_id``, ``response_time_ms`` = the offer's life in
    ms, ``total_timeouts`` = the booking's count so far); return how many this statement closed."""
    if not offer_ids:
        return 0
    rows = (
        await session.execute(
            update(BookingOffer)
            .where(BookingOffer.id.in_(offer_ids), BookingOffer.response.is_(None))
            .values(response=OfferResponse.TIMEOUT.value)
            .returning(
                BookingOffer.id,
                BookingOffer.booking_id,
                BookingOffer.driver_id,
                BookingOffer.sent_at,
                BookingOffer.expires_at,
            )
            .execution_options(synchronize_session=False)
        )
    ).all()
    if not rows:
        return 0
    per_booking: dict[str, int] = {}
    for row in rows:
        per_booking[row.booking_id] = per_booking.get(row.booking_id, 0) + 1
        events.append(session, topics.driver(row.driver_id), "OfferTimedOut", {"booking_id": row.booking_id})
    totals: dict[str, int | None] = {}
    for booking_id in sorted(per_booking):  # a fixed order: two sweepers never deadlock
        totals[booking_id] = await session.scalar(
            update(MatchingMetrics)
            .where(MatchingMetrics.booking_id == booking_id)
            .values(total_timeouts=MatchingMetrics.total_timeouts + per_booking[booking_id])
            .returning(MatchingMetrics.total_timeouts)
        )
    metrics.OFFER_OUTCOMES.labels(OfferResponse.TIMEOUT.value).inc(len(rows))
    for row in sorted(rows, key=lambda r: (r.booking_id, r.driver_id)):
        log.warning(
            "driver timeout",
            booking_id=row.booking_id,
            driver_id=row.driver_id,
            response_time_ms=round((row.expires_at - row.sent_at).total_seconds() * 1000),
            total_timeouts=totals[row.booking_id],
        )
    return len(rows)
