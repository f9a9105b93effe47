"""The broadcast (seed 000 §2.3 startMatching, §3.1 broadcastToAvailableDrivers): a booking is offered to
every available driver at once, with no cap, in waves until someone accepts or the search ends.

* :func:`find_candidates` is the query: AVAILABLE drivers with no active booking, seen recently, not yet
  offered this booking, not excluded, within the wave's radius (km);
* :func:`rank_candidates` is the offer order, pure;
* :func:`offer_wave` writes one wave's offers, messages and events;
* :func:`start_matching` opens the search, :func:`escalate` runs a later wave.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import bulk, events, metrics, topics
from dispatchd.core.errors import InvalidInput, InvalidState
from dispatchd.core.geo import bounding_box, haversine_km
from dispatchd.core.ids import new_id
from dispatchd.core.logging import get_logger
from dispatchd.matching import messages
from dispatchd.matching.lookups import booking_or_404, now
from dispatchd.matching.models import (
    Booking,
    BookingOffer,
    BookingStatus,
    Driver,
    DriverStatus,
    MatchingMetrics,
    PriorityMode,
)
from dispatchd.matching.types import Category, MatchingConfig, MatchingOptions, MatchingResult
from dispatchd.notifications import outbox
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message

log = get_logger("dispatchd.matching")

_OFFERS = BookingOffer.__table__


async def insert_offers(
    session: AsyncSession,
    booking_id: str,
    wave: int,
    sent_at: datetime,
    expires_at: datetime,
    candidates: list[Candidate],
    offer_ids: list[str],
) -> None:
    """One wave's offer rows (``offer_ids[i]`` for ``candidates[i]``; times UTC) in one bulk insert
    (:func:`dispatchd.core.bulk.insert_many`: COPY on PostgreSQL, one executemany on SQLite); what every
    row shares (booking, wave, method, the two times) is processed once."""
    await bulk.insert_many(
        session,
        _OFFERS,
        ("id", "driver_id", "distance_km"),
        [(offer_id, c.driver_id, c.distance_km) for c, offer_id in zip(candidates, offer_ids, strict=True)],
        shared={
            "booking_id": booking_id,
            "wave": wave,
            "method": "WHATSAPP",
            "sent_at": sent_at,
            "expires_at": expires_at,
        },
    )


#: ``MatchingResult.errors`` when nobody could be offered the booking (the search still runs).
NO_DRIVER_AVAILABLE = "NO_DRIVER_AVAILABLE: the search stays open and retries in waves"


@dataclass(frozen=True)
class Candidate:
    """A driver who may be offered a booking: ``distance_km`` to the pickup (None when either position is
    unknown), ``last_seen_at`` (UTC) of the driver's app."""

    driver_id: str
    phone: str
    distance_km: float | None
    last_seen_at: datetime


def rank_candidates(candidates: Iterable[Candidate], mode: PriorityMode) -> list[Candidate]:
    """The offer order (seed 000 §2.2 priorityMode), pure: ``DISTANCE`` = nearest first, unknown distances
    last, ties by driver id; ``RECENT_ACTIVITY`` (§3.1 "lastSeenAt DESC") = most recently seen first,
    ties by driver id descending."""
    if mode is PriorityMode.DISTANCE:
        return sorted(candidates, key=lambda c: (c.distance_km is None, c.distance_km or 0.0, c.driver_id))
    return sorted(candidates, key=lambda c: (c.last_seen_at, c.driver_id), reverse=True)


async def find_candidates(
    session: AsyncSession,
    config: MatchingConfig,
    booking: Booking,
    options: MatchingOptions,
    radius_km: float | None,
) -> list[Candidate]:
    """Every AVAILABLE driver without an active booking, seen within ``driver_stale_after_s`` (s; 0 = no
    limit), not yet offered this booking, not in ``exclude_driver_ids``, and within ``radius_km`` of the
    pickup when both are known (a bounding box in SQL, then haversine). Unordered."""
    at = now(session)
    already_offered = select(BookingOffer.driver_id).where(BookingOffer.booking_id == booking.id)
    query = select(Driver.id, Driver.phone, Driver.lat, Driver.lon, Driver.last_seen_at).where(
        Driver.status == DriverStatus.AVAILABLE.value,
        Driver.current_booking_id.is_(None),
        Driver.id.not_in(already_offered),
    )
    if config.driver_stale_after_s > 0:
        query = query.where(Driver.last_seen_at >= at - timedelta(seconds=config.driver_stale_after_s))
    if options.exclude_driver_ids:
        query = query.where(Driver.id.not_in(options.exclude_driver_ids))
    has_pickup = booking.pickup_lat is not None and booking.pickup_lon is not None
    if radius_km is not None and has_pickup:
        min_lat, max_lat, min_lon, max_lon = bounding_box(booking.pickup_lat, booking.pickup_lon, radius_km)
        query = query.where(Driver.lat.between(min_lat, max_lat), Driver.lon.between(min_lon, max_lon))
    candidates = []
    for driver_id, phone, lat, lon, last_seen_at in (await session.execute(query)).all():
        distance = None
        if has_pickup and lat is not None and lon is not None:
            distance = haversine_km(booking.pickup_lat, booking.pickup_lon, lat, lon)
        if radius_km is not None and (distance is None or distance > radius_km):
            continue
        candidates.append(Candidate(driver_id, phone, distance, last_seen_at))
    return candidates


async def offer_wave(
    session: AsyncSession,
    config: MatchingConfig,
    booking: Booking,
    options: MatchingOptions,
    radius_km: float | None,
) -> list[Candidate]:
    """Offer the booking to this wave's candidates, in :func:`rank_candidates` order: one offer row each
    (expiring after ``offer_timeout_s``, never after the search), one offer message each, ``OfferSent``
    on each driver's topic. Sets ``next_wave_at``: when the offers expire, or ``wave_retry_s`` from now
    when nobody was found. Returns the candidates offered."""
    at = now(session)
    found = await find_candidates(session, config, booking, options, radius_km)
    candidates = rank_candidates(found, options.priority_mode)
    # an offer never outlives its search
    expires_at = min(at + timedelta(seconds=config.offer_timeout_s), booking.search_deadline_at)
    if not candidates:
        booking.next_wave_at = at + timedelta(seconds=config.wave_retry_s)
        metrics.BROADCAST_SIZE.observe(0)
        return candidates
    # Per driver, only what differs: the booking's part of every row, body, payload and event is built once.
    booking_id, wave = booking.id, booking.wave
    offer_ids = [new_id("ofr") for _ in candidates]
    await insert_offers(session, booking_id, wave, at, expires_at, candidates, offer_ids)
    subject = topics.booking(booking_id)
    body = messages.driver_offers(booking, config.offer_timeout_s)
    trip = messages.trip_line(booking)
    buttons = messages.offer_buttons(booking_id)
    await outbox.enqueue(
        session,
        [
            Message(
                recipient=c.phone,
                category=Category.DRIVER_OFFER,
                body=body(c.distance_km),
                subject=subject,
                payload={
                    "booking_id": booking_id,
                    "offer_id": offer_id,
                    "trip": trip,
                    "distance_km": c.distance_km,
                    "buttons": buttons,
                },
                expires_at=expires_at,
            )
            for c, offer_id in zip(candidates, offer_ids, strict=True)
        ],
    )
    trip_fields = {
        "expires_at": expires_at.isoformat(),
        "pickup_address": booking.pickup_address,
        "pickup_lat": booking.pickup_lat,
        "pickup_lon": booking.pickup_lon,
        "drop_address": booking.drop_address,
        "drop_lat": booking.drop_lat,
        "drop_lon": booking.drop_lon,
    }
    for c, offer_id in zip(candidates, offer_ids, strict=True):
        events.append(
            session,
            topics.driver(c.driver_id),
            "OfferSent",
            {
                "booking_id": booking_id,
                "offer_id": offer_id,
                "wave": wave,
                "distance_km": c.distance_km,
                **trip_fields,
            },
        )
    booking.next_wave_at = expires_at
    metrics.OFFERS_SENT.inc(len(candidates))
    metrics.BROADCAST_SIZE.observe(len(candidates))
    return candidates


async def start_matching(
    session: AsyncSession, config: MatchingConfig, booking_id: str, options: MatchingOptions
) -> MatchingResult:
    """Seed 000 §2.3 startMatching in the caller's unit of work: see
    :meth:`dispatchd.matching.service.MatchingService.start_matching_in`."""
    at = now(session)
    booking = await booking_or_404(session, booking_id, lock=True)
    if booking.status != BookingStatus.PENDING:
        raise InvalidState(f"booking {booking_id} is {booking.status}; only a PENDING booking can be matched")
    needs_position = options.max_distance_km is not None or options.priority_mode is PriorityMode.DISTANCE
    if needs_position and (booking.pickup_lat is None or booking.pickup_lon is None):
        raise InvalidInput("max_distance_km and priority_mode DISTANCE need pickup_lat and pickup_lon")
    result = await session.execute(
        update(Booking)
        .where(Booking.id == booking_id, Booking.status == BookingStatus.PENDING.value)
        .values(
            status=BookingStatus.SEARCHING.value,
            version=Booking.version + 1,
            wave=1,
            search_options=options.as_json(),
            search_started_at=at,
            search_deadline_at=at + timedelta(seconds=config.search_timeout_s),
            updated_at=at,
        )
    )
    if result.rowcount != 1:
        raise InvalidState(f"booking {booking_id} is no longer PENDING")
    await session.refresh(booking)
    candidates = await offer_wave(session, config, booking, options, options.max_distance_km)
    metrics_row = MatchingMetrics(
        id=new_id("mtm"),
        booking_id=booking_id,
        total_drivers_notified=len(candidates),
        total_drivers_responded=0,
        total_timeouts=0,
        waves=1,
        started_at=at,
        created_at=at,
    )
    session.add(metrics_row)
    await outbox.enqueue(
        session,
        [
            Message(
                recipient=booking.customer_phone,
                category=Category.CUSTOMER_SEARCH_STARTED,
                body=messages.search_started(len(candidates)),
                subject=topics.booking(booking_id),
            )
        ],
    )
    events.append(
        session,
        topics.booking(booking_id),
        "MatchingStarted",
        {
            "status": booking.status,
            "version": booking.version,
            "drivers_notified": len(candidates),
            "search_deadline_at": booking.search_deadline_at.isoformat(),
        },
    )
    metrics.MATCHING_STARTED.inc()
    log.info(
        "matching started",
        booking_id=booking_id,
        drivers_notified=len(candidates),
        search_radius_km=options.max_distance_km,
    )
    return MatchingResult(
        success=True,
        drivers_notified=len(candidates),
        driver_ids=[c.driver_id for c in candidates],
        matching_metrics_id=metrics_row.id,
        booking=booking,
        errors=[] if candidates else [NO_DRIVER_AVAILABLE],
    )


async def escalate(session: AsyncSession, config: MatchingConfig, booking: Booking) -> None:
    """One due wave of a SEARCHING booking (locked by the caller). While an offer is still open, only
    postpone ``next_wave_at`` to its expiry. Otherwise offer the booking to the drivers who became
    available since (never twice to one driver), with the radius grown by ``escalation_radius_factor``
    per wave when ``max_distance_km`` is set; ``SearchEscalated`` and the customer's "recherche élargie"
    (:func:`notify_search_progress`) when someone was found."""
    at = now(session)
    still_open = await session.scalar(
        select(func.max(BookingOffer.expires_at)).where(
            BookingOffer.booking_id == booking.id, BookingOffer.response.is_(None)
        )
    )
    if still_open is not None:
        booking.next_wave_at = max(still_open, at)
        return
    options = MatchingOptions.from_json(booking.search_options)
    booking.wave += 1
    radius = None
    if options.max_distance_km is not None:
        radius = options.max_distance_km * config.escalation_radius_factor ** (booking.wave - 1)
    candidates = await offer_wave(session, config, booking, options, radius)
    if not candidates:
        return
    total_notified = await session.scalar(
        update(MatchingMetrics)
        .where(MatchingMetrics.booking_id == booking.id)
        .values(
            total_drivers_notified=MatchingMetrics.total_drivers_notified + len(candidates),
            waves=MatchingMetrics.waves + 1,
        )
        .returning(MatchingMetrics.total_drivers_notified)
    )
    events.append(
        session,
        topics.booking(booking.id),
        "SearchEscalated",
        {"wave": booking.wave, "drivers_notified": len(candidates), "radius_km": radius},
    )
    log.info("search escalated", booking_id=booking.id, wave=booking.wave, drivers=len(candidates))
    await notify_search_progress(session, config, booking, len(candidates), total_notified or 0, radius)


async def notify_search_progress(
    session: AsyncSession,
    config: MatchingConfig,
    booking: Booking,
    drivers_count: int,
    total_notified: int,
    radius_km: float | None,
) -> bool:
    """Seed 000 §7.1 notifySearchProgress: tell the customer the search widened (wave ``booking.wave``,
    ``drivers_count`` more drivers, ``radius_km`` km or None), unless such a message about this booking was
    written less than ``search_progress_interval_s`` seconds ago (the outbox is the record). The message
    expires with the search. Returns whether one was written."""
    at = now(session)
    topic = topics.booking(booking.id)
    if config.search_progress_interval_s > 0:
        recent = await session.scalar(
            select(Notification.id)
            .where(
                Notification.subject == topic,
                Notification.category == Category.CUSTOMER_SEARCH_PROGRESS.value,
                Notification.created_at > at - timedelta(seconds=config.search_progress_interval_s),
            )
            .limit(1)
        )
        if recent is not None:
            return False
    await outbox.enqueue(
        session,
        [
            Message(
                recipient=booking.customer_phone,
                category=Category.CUSTOMER_SEARCH_PROGRESS,
                body=messages.search_progress(booking.wave, drivers_count, total_notified, radius_km),
                subject=topic,
                expires_at=booking.search_deadline_at,
            )
        ],
    )
    return True
