"""A booking's life outside the race (seed 000 §1.1 statuses): created PENDING, relaunched after a search
that timed out, cancelled, completed, or timed out by the sweeper. Every function works inside the
caller's unit of work and follows the lock order booking → offers → metrics → driver."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, metrics, topics
from dispatchd.core.errors import InvalidState
from dispatchd.core.ids import new_id
from dispatchd.core.logging import get_logger
from dispatchd.matching import broadcast, drivers, messages
from dispatchd.matching.lookups import booking_or_404, now, phones
from dispatchd.matching.models import Booking, BookingStatus, FinalStatus, MatchingMetrics, OfferResponse
from dispatchd.matching.offers import close_offers
from dispatchd.matching.schemas import BookingCreate
from dispatchd.matching.types import Category, MatchingConfig, MatchingOptions, MatchingResult
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Cancellation, Message
from dispatchd.notifications.policy import Priority

log = get_logger("dispatchd.matching")

#: The customer and trip columns a booking is created from, copied by a relaunch.
TRIP_COLUMNS = tuple(BookingCreate.model_fields)


async def create_booking(session: AsyncSession, data: dict[str, Any]) -> Booking:
    """Insert a PENDING booking from ``data`` (as :class:`BookingCreate`); ``BookingCreated``."""
    at = now(session)
    booking = Booking(
        id=new_id("bkg"),
        status=BookingStatus.PENDING.value,
        version=1,
        wave=0,
        created_at=at,
        updated_at=at,
        **data,
    )
    session.add(booking)
    await session.flush()
    events.append(session, topics.booking(booking.id), "BookingCreated", {"status": booking.status})
    return booking


async def relaunch(session: AsyncSession, config: MatchingConfig, booking_id: str) -> MatchingResult:
    """Seed 000 §4 handleBookingTimeout "proposer au client de réessayer", §7.1 answer *1* "Réessayer
    maintenant": see :meth:`dispatchd.matching.service.MatchingService.relaunch_in`."""
    old = await booking_or_404(session, booking_id, lock=True)
    if old.status != BookingStatus.TIMEOUT:
        raise InvalidState(
            f"booking {booking_id} is {old.status}; only a search that timed out can be relaunched"
        )
    earlier = await session.scalar(
        select(events.Event.data)
        .where(events.Event.topic == topics.booking(booking_id), events.Event.type == "BookingRelaunched")
        .limit(1)
    )
    if earlier is not None:
        raise InvalidState(f"booking {booking_id} was already relaunched as {earlier.get('new_booking_id')}")
    new = await create_booking(session, {name: getattr(old, name) for name in TRIP_COLUMNS})
    options = MatchingOptions.from_json(old.search_options)
    result = await broadcast.start_matching(session, config, new.id, options)
    events.append(
        session,
        topics.booking(booking_id),
        "BookingRelaunched",
        {"new_booking_id": new.id, "drivers_notified": result.drivers_notified},
    )
    log.info("search relaunched", booking_id=booking_id, new_booking_id=new.id)
    return result


async def cancel(session: AsyncSession, config: MatchingConfig, booking_id: str, reason: str) -> Booking:
    """Seed 000 §2.1 cancelMatching: see :meth:`dispatchd.matching.service.MatchingService.cancel`."""
    at = now(session)
    booking = await booking_or_404(session, booking_id, lock=True)
    previous = BookingStatus(booking.status)
    if previous not in (BookingStatus.PENDING, BookingStatus.SEARCHING, BookingStatus.ASSIGNED):
        raise InvalidState(f"booking {booking_id} is {booking.status} and can no longer be cancelled")
    result = await session.execute(
        update(Booking)
        .where(Booking.id == booking_id, Booking.version == booking.version)
        .values(
            status=BookingStatus.CANCELLED.value,
            version=Booking.version + 1,
            cancel_reason=reason,
            finished_at=at,
            next_wave_at=None,
            updated_at=at,
        )
    )
    if result.rowcount != 1:
        raise InvalidState(f"booking {booking_id} changed meanwhile; read it again")
    await session.refresh(booking)
    topic = topics.booking(booking_id)
    notices: list[Message] = []
    if previous is BookingStatus.SEARCHING:
        notices += await close_open_offers(session, config, booking, tell_drivers=True)
        await outbox.cancel(session, [moot_on_close(booking, "booking cancelled")])
        await finish_metrics(session, booking_id, FinalStatus.CANCELLED)
    if previous is BookingStatus.ASSIGNED and booking.driver_id:
        driver = await drivers.release(session, booking)
        notices.append(
            Message(
                recipient=driver.phone,
                category=Category.OFFER_CANCELLED,
                body=messages.booking_cancelled_driver(booking),
                subject=topic,
                priority=Priority.NORMAL,  # their own trip, not a notice about someone else's
            )
        )
    notices.append(
        Message(
            recipient=booking.customer_phone,
            category=Category.CUSTOMER_CANCELLED,
            body=messages.booking_cancelled_customer(booking),
            subject=topic,
        )
    )
    await outbox.enqueue(session, notices)
    cancelled = {"status": booking.status, "version": booking.version, "reason": reason, "previous": previous}
    events.append(session, topic, "BookingCancelled", cancelled)
    if booking.driver_id:
        events.append(session, topics.driver(booking.driver_id), "BookingCancelled", cancelled)
    log.info("booking cancelled", booking_id=booking_id, previous_status=previous.value, reason=reason)
    return booking


async def complete(session: AsyncSession, booking_id: str, lat: float | None, lon: float | None) -> Booking:
    """End an ASSIGNED trip: see :meth:`dispatchd.matching.service.MatchingService.complete`."""
    at = now(session)
    booking = await booking_or_404(session, booking_id, lock=True)
    if booking.status != BookingStatus.ASSIGNED:
        raise InvalidState(f"booking {booking_id} is {booking.status}; only an ASSIGNED booking can complete")
    booking.status = BookingStatus.COMPLETED.value
    booking.version += 1
    booking.finished_at = booking.updated_at = at
    await session.flush()
    await drivers.release(session, booking, lat=lat, lon=lon)
    completed = {"status": booking.status, "version": booking.version, "driver_id": booking.driver_id}
    events.append(session, topics.booking(booking_id), "BookingCompleted", completed)
    events.append(session, topics.driver(booking.driver_id), "BookingCompleted", completed)
    return booking


async def time_out(session: AsyncSession, config: MatchingConfig, booking: Booking) -> Cancellation:
    """Seed 000 §4 handleBookingTimeout for one SEARCHING booking past its deadline (locked by the
    caller): TIMEOUT, open offers CANCELLED, metrics TIMEOUT, the customer's "aucun chauffeur disponible"
    (which offers to try again: :func:`relaunch`) and every admin's alert, ``BookingTimedOut``. Returns
    the cancellation of what became moot, for the caller to apply with the rest of its batch."""
    at = now(session)
    booking.status = BookingStatus.TIMEOUT.value
    booking.version += 1
    booking.finished_at = booking.updated_at = at
    booking.next_wave_at = None
    await session.flush()
    await close_open_offers(session, config, booking, tell_drivers=False)
    await finish_metrics(session, booking.id, FinalStatus.TIMEOUT)
    topic = topics.booking(booking.id)
    admins = config.admin_phones or ("admin",)
    await outbox.enqueue(
        session,
        [
            Message(
                recipient=booking.customer_phone,
                category=Category.CUSTOMER_NO_DRIVER,
                body=messages.search_failed(),
                subject=topic,
            ),
            *(
                Message(
                    recipient=admin,
                    category=Category.ADMIN_ALERT,
                    body=messages.admin_timeout_alert(booking, config.search_timeout_s),
                    subject=topic,
                )
                for admin in admins
            ),
        ],
    )
    events.append(session, topic, "BookingTimedOut", {"status": booking.status, "version": booking.version})
    log.warning("search timeout", booking_id=booking.id)  # never a customer's phone in a log
    return moot_on_close(booking, "search timed out")


def moot_on_close(booking: Booking, reason: str) -> Cancellation:
    """What a search ending without a driver makes moot: its unsent offers and the customer's
    "recherche en cours" and "recherche élargie"."""
    moot = (Category.DRIVER_OFFER, Category.CUSTOMER_SEARCH_STARTED, Category.CUSTOMER_SEARCH_PROGRESS)
    return Cancellation(reason, moot, subject=topics.booking(booking.id))


async def close_open_offers(
    session: AsyncSession, config: MatchingConfig, booking: Booking, *, tell_drivers: bool
) -> list[Message]:
    """Open offers → CANCELLED (``OfferCancelled`` on each driver's topic); return the messages telling
    the drivers who actually received the offer (when asked). The caller cancels the queued messages this
    makes moot (:func:`moot_on_close`)."""
    closed = await close_offers(session, booking.id, OfferResponse.CANCELLED)
    for driver_id in closed:
        events.append(session, topics.driver(driver_id), "OfferCancelled", {"booking_id": booking.id})
    if not tell_drivers or not closed:
        return []
    topic = topics.booking(booking.id)
    handed = await outbox.handed_recipients(session, subject=topic, category=Category.DRIVER_OFFER)
    return [
        Message(
            recipient=phone,
            category=Category.OFFER_CANCELLED,
            body=messages.booking_cancelled_driver(booking),
            subject=topic,
            payload={"booking_id": booking.id, "trip": messages.trip_line(booking)},
            # a notice about an offer: useless once the offer would have expired anyway
            expires_at=now(session) + timedelta(seconds=config.offer_timeout_s),
        )
        for phone in await phones(session, closed)
        if phone in handed
    ]


async def finish_metrics(session: AsyncSession, booking_id: str, final: FinalStatus) -> None:
    """``matching_metrics.final_status`` of the booking's search."""
    await session.execute(
        update(MatchingMetrics)
        .where(MatchingMetrics.booking_id == booking_id)
        .values(final_status=final.value)
    )
    metrics.BOOKINGS_FINISHED.labels(final.value).inc()
