"""Matching service (seed 000 §2): broadcast to every available driver, the first accept wins.

Invariants, each settled by the database (DESIGN.md, idea 2):

* exactly one driver per booking: ``UPDATE bookings SET status='ASSIGNED' … WHERE status='SEARCHING'
  AND version=:v`` decides, checked by ``rowcount``;
* one active booking per driver: ``UPDATE drivers SET current_booking_id=:b … WHERE
  current_booking_id IS NULL`` in the same transaction (savepoint), plus a partial unique index;
* deadlines are columns: ``booking_offers.expires_at`` (30 s), ``bookings.search_deadline_at`` (5 min),
  ``bookings.next_wave_at`` (escalation); :mod:`dispatchd.matching.deadlines` handles them.

Lock order, everywhere, so that PostgreSQL never deadlocks: booking → offers → metrics → driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, metrics
from dispatchd.core.db import Database, lock_for_update, retry_transient
from dispatchd.core.errors import Conflict, InvalidInput, InvalidState, NotFound
from dispatchd.core.ids import new_id
from dispatchd.core.logging import get_logger
from dispatchd.matching import messages
from dispatchd.matching.geo import bounding_box, haversine_km
from dispatchd.matching.models import (
    Booking,
    BookingOffer,
    BookingStatus,
    Driver,
    DriverStatus,
    FinalStatus,
    MatchingMetrics,
    OfferResponse,
    PriorityMode,
)
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Cancellation, Message
from dispatchd.notifications.policy import Priority

log = get_logger("dispatchd.matching")


class Category(StrEnum):
    DRIVER_OFFER = "driver_offer"
    OFFER_TAKEN = "offer_taken"
    OFFER_CANCELLED = "offer_cancelled"
    CUSTOMER_SEARCH_STARTED = "customer_search_started"
    CUSTOMER_DRIVER_FOUND = "customer_driver_found"
    CUSTOMER_NO_DRIVER = "customer_no_driver"
    CUSTOMER_CANCELLED = "customer_cancelled"
    ADMIN_ALERT = "admin_alert"


class Action(StrEnum):
    ASSIGNED = "ASSIGNED"
    REJECTED = "REJECTED"
    ALREADY_TAKEN = "ALREADY_TAKEN"
    BOOKING_CANCELLED = "BOOKING_CANCELLED"
    OFFER_EXPIRED = "OFFER_EXPIRED"
    DRIVER_BUSY = "DRIVER_BUSY"


ACTION_MESSAGES = {
    Action.ASSIGNED: "Course attribuée : elle est à vous.",
    Action.REJECTED: "Refus enregistré.",
    Action.ALREADY_TAKEN: "Course déjà prise par un autre chauffeur.",
    Action.BOOKING_CANCELLED: "Course annulée.",
    Action.OFFER_EXPIRED: "Offre expirée.",
    Action.DRIVER_BUSY: "Vous avez déjà une course en cours.",
}


@dataclass(frozen=True)
class MatchingConfig:
    """Durations in seconds; see :class:`dispatchd.config.Settings` for each."""

    offer_timeout_s: float = 30.0
    search_timeout_s: float = 300.0
    wave_retry_s: float = 10.0
    escalation_radius_factor: float = 1.5
    driver_stale_after_s: float = 900.0
    admin_phones: tuple[str, ...] = ()


@dataclass(frozen=True)
class MatchingOptions:
    """Seed 000 §2.2 MatchingOptions. ``max_distance_km`` None = unlimited."""

    max_distance_km: float | None = None
    exclude_driver_ids: tuple[str, ...] = ()
    priority_mode: PriorityMode = PriorityMode.RECENT_ACTIVITY

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority_mode", PriorityMode(self.priority_mode))
        object.__setattr__(self, "exclude_driver_ids", tuple(self.exclude_driver_ids))

    def as_json(self) -> dict[str, Any]:
        return {
            "max_distance_km": self.max_distance_km,
            "exclude_driver_ids": list(self.exclude_driver_ids),
            "priority_mode": self.priority_mode.value,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> MatchingOptions:
        data = data or {}
        return cls(
            max_distance_km=data.get("max_distance_km"),
            exclude_driver_ids=tuple(data.get("exclude_driver_ids") or ()),
            priority_mode=PriorityMode(data.get("priority_mode") or PriorityMode.RECENT_ACTIVITY),
        )


@dataclass
class MatchingResult:
    """Seed 000 §2.2 MatchingResult."""

    success: bool
    drivers_notified: int
    driver_ids: list[str]
    matching_metrics_id: str
    booking: Booking
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ResponseResult:
    """Seed 000 §2.2 ResponseResult (plus ``DRIVER_BUSY``)."""

    success: bool
    action: Action
    booking_id: str
    driver_id: str

    @property
    def message(self) -> str:
        return ACTION_MESSAGES[self.action]


@dataclass(frozen=True)
class _Candidate:
    driver_id: str
    phone: str
    distance_km: float | None


class _Abort(Exception):
    """Rolls back the accept savepoint; carries the answer to give."""

    def __init__(self, action: Action) -> None:
        self.action = action


def _now(session: AsyncSession) -> datetime:
    return session.info["now"]


def _action_for(booking_status: str) -> Action:
    """What an ACCEPT gets once the booking has left SEARCHING."""
    if booking_status == BookingStatus.CANCELLED:
        return Action.BOOKING_CANCELLED
    if booking_status == BookingStatus.TIMEOUT:
        return Action.OFFER_EXPIRED
    return Action.ALREADY_TAKEN


def _elapsed_ms(session: AsyncSession, offer: BookingOffer) -> int:
    """Server-measured response time: the server clock is the authority, not the app's."""
    return int((_now(session) - offer.sent_at).total_seconds() * 1000)


def _booking_topic(booking_id: str) -> str:
    return f"booking:{booking_id}"


def _driver_topic(driver_id: str) -> str:
    return f"driver:{driver_id}"


class MatchingService:
    """Seed 000 §2.1 MatchingService over one :class:`Database`."""

    def __init__(self, db: Database, config: MatchingConfig | None = None) -> None:
        self.db = db
        self.config = config or MatchingConfig()

    # ---------------------------------------------------------------- drivers

    async def create_driver(self, data: dict[str, Any]) -> Driver:
        """Register a driver. ``data`` as :class:`DriverCreate`. Raises :class:`Conflict` on a known phone."""
        try:
            async with self.db.transaction() as session:
                now = _now(session)
                driver = Driver(
                    id=new_id("drv"),
                    created_at=now,
                    updated_at=now,
                    last_seen_at=now,
                    current_booking_id=None,
                    **data,
                )
                session.add(driver)
                await session.flush()
                events.append(session, _driver_topic(driver.id), "DriverUpdated", {"status": driver.status})
        except IntegrityError:
            raise Conflict(f"a driver with phone {data.get('phone')} already exists") from None
        return driver

    async def get_driver(self, driver_id: str) -> Driver:
        async with self.db.read() as session:
            return await self._driver_or_404(session, driver_id)

    async def list_drivers(self, status: DriverStatus | None = None, limit: int = 500) -> list[Driver]:
        async with self.db.read() as session:
            query = select(Driver).order_by(Driver.created_at, Driver.id).limit(limit)
            if status:
                query = query.where(Driver.status == status.value)
            return list((await session.scalars(query)).all())

    @retry_transient
    async def update_driver(self, driver_id: str, changes: dict[str, Any]) -> Driver:
        """Apply ``changes`` (status AVAILABLE/OFFLINE, position, profile).

        Raises :class:`InvalidInput` for status BUSY (set by the engine only), :class:`InvalidState`
        when a driver holding an active booking asks to become AVAILABLE.
        """
        status = changes.get("status")
        if status == DriverStatus.BUSY:
            raise InvalidInput("status BUSY is set by the engine when a driver wins a booking")
        try:
            async with self.db.transaction() as session:
                driver = await self._driver_or_404(session, driver_id, lock=True)
                if status == DriverStatus.AVAILABLE and driver.current_booking_id is not None:
                    raise InvalidState(
                        f"driver {driver_id} holds booking {driver.current_booking_id}; complete or cancel it"
                    )
                for name, value in changes.items():
                    setattr(driver, name, value)
                driver.updated_at = driver.last_seen_at = _now(session)
                await session.flush()
                events.append(
                    session,
                    _driver_topic(driver_id),
                    "DriverUpdated",
                    {"status": driver.status, "lat": driver.lat, "lon": driver.lon},
                )
        except IntegrityError:
            raise Conflict(f"a driver with phone {changes.get('phone')} already exists") from None
        return driver

    @retry_transient
    async def heartbeat(self, driver_id: str, lat: float | None = None, lon: float | None = None) -> Driver:
        """Record that the driver's app is alive (``last_seen_at`` = now), optionally its position."""
        async with self.db.transaction() as session:
            driver = await self._driver_or_404(session, driver_id, lock=True)
            driver.last_seen_at = _now(session)
            if lat is not None and lon is not None:
                driver.lat, driver.lon = lat, lon
        return driver

    # --------------------------------------------------------------- bookings

    async def create_booking(self, data: dict[str, Any]) -> Booking:
        """Create a PENDING booking from ``data`` (see :class:`BookingCreate`)."""
        async with self.db.transaction() as session:
            now = _now(session)
            booking = Booking(
                id=new_id("bkg"),
                status=BookingStatus.PENDING.value,
                version=1,
                wave=0,
                created_at=now,
                updated_at=now,
                **data,
            )
            session.add(booking)
            await session.flush()
            events.append(session, _booking_topic(booking.id), "BookingCreated", {"status": booking.status})
        return booking

    async def get_booking(self, booking_id: str) -> Booking:
        async with self.db.read() as session:
            return await self._booking_or_404(session, booking_id)

    async def list_offers(self, booking_id: str) -> list[BookingOffer]:
        async with self.db.read() as session:
            await self._booking_or_404(session, booking_id)
            rows = await session.scalars(
                select(BookingOffer)
                .where(BookingOffer.booking_id == booking_id)
                .order_by(BookingOffer.sent_at, BookingOffer.id)
            )
            return list(rows.all())

    # --------------------------------------------------------------- matching

    @retry_transient
    async def start_matching(self, booking_id: str, options: MatchingOptions | None = None) -> MatchingResult:
        """Seed 000 §2.3 startMatching: offer a PENDING booking to every available driver at once.

        One transaction writes the booking's SEARCHING state and deadlines, one offer per driver (no cap),
        each driver's offer message, the customer's "recherche en cours" message, the metrics row and
        the events. Raises :class:`NotFound` (BOOKING_NOT_FOUND), :class:`InvalidState` when the booking
        is not PENDING, :class:`InvalidInput` when distance options need a pickup position it lacks.
        """
        options = options or MatchingOptions()
        async with self.db.transaction() as session:
            now = _now(session)
            booking = await self._booking_or_404(session, booking_id, lock=True)
            if booking.status != BookingStatus.PENDING:
                raise InvalidState(
                    f"booking {booking_id} is {booking.status}; only a PENDING booking can be matched"
                )
            needs_position = (
                options.max_distance_km is not None or options.priority_mode is PriorityMode.DISTANCE
            )
            if needs_position and (booking.pickup_lat is None or booking.pickup_lon is None):
                raise InvalidInput(
                    "max_distance_km and priority_mode DISTANCE need pickup_lat and pickup_lon"
                )
            result = await session.execute(
                update(Booking)
                .where(Booking.id == booking_id, Booking.status == BookingStatus.PENDING.value)
                .values(
                    status=BookingStatus.SEARCHING.value,
                    version=Booking.version + 1,
                    wave=1,
                    search_options=options.as_json(),
                    search_started_at=now,
                    search_deadline_at=now + timedelta(seconds=self.config.search_timeout_s),
                    updated_at=now,
                )
            )
            if result.rowcount != 1:
                raise InvalidState(f"booking {booking_id} is no longer PENDING")
            await session.refresh(booking)
            candidates = await self._offer_wave(session, booking, options, options.max_distance_km)
            metrics_row = MatchingMetrics(
                id=new_id("mtm"),
                booking_id=booking_id,
                total_drivers_notified=len(candidates),
                total_drivers_responded=0,
                total_timeouts=0,
                waves=1,
                started_at=now,
                created_at=now,
            )
            session.add(metrics_row)
            await outbox.enqueue(
                session,
                [
                    Message(
                        recipient=booking.customer_phone,
                        category=Category.CUSTOMER_SEARCH_STARTED,
                        body=messages.search_started(len(candidates)),
                        subject=_booking_topic(booking_id),
                    )
                ],
            )
            events.append(
                session,
                _booking_topic(booking_id),
                "MatchingStarted",
                {
                    "status": booking.status,
                    "version": booking.version,
                    "drivers_notified": len(candidates),
                    "search_deadline_at": booking.search_deadline_at.isoformat(),
                },
            )
        metrics.MATCHING_STARTED.inc()
        errors = [] if candidates else ["NO_DRIVER_AVAILABLE: the search stays open and retries in waves"]
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
            errors=errors,
        )

    async def _find_drivers(
        self, session: AsyncSession, booking: Booking, options: MatchingOptions, radius_km: float | None
    ) -> list[_Candidate]:
        """Every AVAILABLE driver without an active booking, not yet offered this booking, in order."""
        now = _now(session)
        already_offered = select(BookingOffer.driver_id).where(BookingOffer.booking_id == booking.id)
        query = select(Driver.id, Driver.phone, Driver.lat, Driver.lon, Driver.last_seen_at).where(
            Driver.status == DriverStatus.AVAILABLE.value,
            Driver.current_booking_id.is_(None),
            Driver.id.not_in(already_offered),
        )
        if self.config.driver_stale_after_s > 0:
            query = query.where(
                Driver.last_seen_at >= now - timedelta(seconds=self.config.driver_stale_after_s)
            )
        if options.exclude_driver_ids:
            query = query.where(Driver.id.not_in(options.exclude_driver_ids))
        has_pickup = booking.pickup_lat is not None and booking.pickup_lon is not None
        if radius_km is not None and has_pickup:
            min_lat, max_lat, min_lon, max_lon = bounding_box(
                booking.pickup_lat, booking.pickup_lon, radius_km
            )
            query = query.where(Driver.lat.between(min_lat, max_lat), Driver.lon.between(min_lon, max_lon))
        rows = (await session.execute(query)).all()
        candidates: list[tuple[_Candidate, datetime]] = []
        for driver_id, phone, lat, lon, last_seen_at in rows:
            distance = None
            if has_pickup and lat is not None and lon is not None:
                distance = haversine_km(booking.pickup_lat, booking.pickup_lon, lat, lon)
            if radius_km is not None and (distance is None or distance > radius_km):
                continue
            candidates.append((_Candidate(driver_id, phone, distance), last_seen_at))
        if options.priority_mode is PriorityMode.DISTANCE:
            candidates.sort(key=lambda c: (c[0].distance_km is None, c[0].distance_km or 0.0, c[0].driver_id))
        else:
            candidates.sort(key=lambda c: (c[1], c[0].driver_id), reverse=True)
        return [candidate for candidate, _ in candidates]

    async def _offer_wave(
        self, session: AsyncSession, booking: Booking, options: MatchingOptions, radius_km: float | None
    ) -> list[_Candidate]:
        """Write offers, offer messages and OfferSent events for one wave; set the next wave's deadline."""
        now = _now(session)
        candidates = await self._find_drivers(session, booking, options, radius_km)
        # an offer never outlives its search
        expires_at = min(now + timedelta(seconds=self.config.offer_timeout_s), booking.search_deadline_at)
        if candidates:
            offers = [
                {
                    "id": new_id("ofr"),
                    "booking_id": booking.id,
                    "driver_id": c.driver_id,
                    "wave": booking.wave,
                    "distance_km": c.distance_km,
                    "method": "WHATSAPP",
                    "sent_at": now,
                    "expires_at": expires_at,
                }
                for c in candidates
            ]
            await session.execute(BookingOffer.__table__.insert(), offers)
            await outbox.enqueue(
                session,
                [
                    Message(
                        recipient=c.phone,
                        category=Category.DRIVER_OFFER,
                        body=messages.driver_offer(booking, c.distance_km, self.config.offer_timeout_s),
                        subject=_booking_topic(booking.id),
                        payload={
                            "booking_id": booking.id,
                            "offer_id": offer["id"],
                            "trip": messages.trip_line(booking),
                            "distance_km": c.distance_km,
                            "buttons": [
                                {"id": f"ACCEPT:{booking.id}", "title": "ACCEPTER"},
                                {"id": f"REJECT:{booking.id}", "title": "REFUSER"},
                            ],
                        },
                        expires_at=expires_at,
                    )
                    for c, offer in zip(candidates, offers, strict=True)
                ],
            )
            for c, offer in zip(candidates, offers, strict=True):
                events.append(
                    session,
                    _driver_topic(c.driver_id),
                    "OfferSent",
                    {
                        "booking_id": booking.id,
                        "offer_id": offer["id"],
                        "wave": booking.wave,
                        "expires_at": expires_at.isoformat(),
                        "distance_km": c.distance_km,
                        "pickup_address": booking.pickup_address,
                        "pickup_lat": booking.pickup_lat,
                        "pickup_lon": booking.pickup_lon,
                        "drop_address": booking.drop_address,
                        "drop_lat": booking.drop_lat,
                        "drop_lon": booking.drop_lon,
                    },
                )
            booking.next_wave_at = expires_at
            metrics.OFFERS_SENT.inc(len(candidates))
        else:
            booking.next_wave_at = now + timedelta(seconds=self.config.wave_retry_s)
        metrics.BROADCAST_SIZE.observe(len(candidates))
        return candidates

    @retry_transient
    async def respond(self, booking_id: str, driver_id: str, answer: str) -> ResponseResult:
        """Seed 000 §2.3 handleDriverResponse: ``answer`` is ``"ACCEPT"`` or ``"REJECT"``.

        Exactly one ACCEPT per booking gets ``ASSIGNED``; the rest get ``ALREADY_TAKEN``, or
        ``BOOKING_CANCELLED`` / ``OFFER_EXPIRED`` / ``DRIVER_BUSY``. Repeating an answer repeats its result.
        Raises :class:`NotFound` (BOOKING_NOT_FOUND, OFFER_NOT_FOUND).
        """
        try:
            async with self.db.transaction() as session:
                now = _now(session)
                offer, status, version = await self._offer_with_booking(session, booking_id, driver_id)
                if offer.response is not None:
                    return await self._settled_result(session, offer, answer, status)
                if now >= offer.expires_at:
                    await self._booking_or_404(session, booking_id, lock=True)  # lock order: booking first
                    await self._expire_offers(session, [offer.id])
                    await self._record_answer(session, offer, answer)
                    return ResponseResult(False, Action.OFFER_EXPIRED, booking_id, driver_id)
                if answer == "REJECT":
                    return await self._reject(session, offer)
                return await self._accept(session, offer, status, version)
        except _Abort as lost:
            # The rare refusals after the booking row was updated roll everything back;
            # the driver's answer is kept in a transaction of its own.
            async with self.db.transaction() as session:
                offer, _, _ = await self._offer_with_booking(session, booking_id, driver_id)
                if lost.action is not Action.DRIVER_BUSY:
                    await self._record_answer(session, offer, "ACCEPT")
            return ResponseResult(False, lost.action, booking_id, driver_id)

    async def _offer_with_booking(
        self, session: AsyncSession, booking_id: str, driver_id: str
    ) -> tuple[BookingOffer, str, int]:
        """The driver's offer with its booking's ``(status, version)``, in one query."""
        row = (
            await session.execute(
                select(BookingOffer, Booking.status, Booking.version)
                .join(Booking, Booking.id == BookingOffer.booking_id)
                .where(BookingOffer.booking_id == booking_id, BookingOffer.driver_id == driver_id)
            )
        ).first()
        if row is None:
            await self._booking_or_404(session, booking_id)
            raise NotFound(
                f"driver {driver_id} has no offer for booking {booking_id}", code="OFFER_NOT_FOUND"
            )
        return row[0], row[1], row[2]

    async def _settled_result(
        self, session: AsyncSession, offer: BookingOffer, answer: str, booking_status: str
    ) -> ResponseResult:
        """The answer for an offer that is already resolved (a repeat, or a late tap)."""
        await self._record_answer(session, offer, answer)
        action = {
            OfferResponse.ACCEPTED: Action.ASSIGNED,
            OfferResponse.REJECTED: Action.REJECTED,
            OfferResponse.TIMEOUT: Action.OFFER_EXPIRED,
            OfferResponse.TAKEN: Action.ALREADY_TAKEN,
        }.get(OfferResponse(offer.response))
        if action is None:  # CANCELLED: by a cancel, or by the end of the search
            action = _action_for(booking_status)
        success = action in (Action.ASSIGNED, Action.REJECTED) and (
            (action is Action.ASSIGNED) == (answer == "ACCEPT")
        )
        return ResponseResult(success, action, offer.booking_id, offer.driver_id)

    async def _resolve_open_offer(
        self, session: AsyncSession, offer: BookingOffer, response: OfferResponse, answer: str
    ) -> bool:
        """Close the offer with the driver's answer, only if it is still open; True when it was."""
        result = await session.execute(
            update(BookingOffer)
            .where(BookingOffer.id == offer.id, BookingOffer.response.is_(None))
            .values(
                response=response.value,
                driver_answer=answer,
                responded_at=_now(session),
                response_time_ms=_elapsed_ms(session, offer),
            )
        )
        return result.rowcount == 1

    async def _record_answer(self, session: AsyncSession, offer: BookingOffer, answer: str) -> None:
        """Keep the first answer a driver gave, even when it came too late to count."""
        await session.execute(
            update(BookingOffer)
            .where(BookingOffer.id == offer.id, BookingOffer.responded_at.is_(None))
            .values(
                responded_at=_now(session), driver_answer=answer, response_time_ms=_elapsed_ms(session, offer)
            )
        )

    async def _reject(self, session: AsyncSession, offer: BookingOffer) -> ResponseResult:
        now = _now(session)
        booking = await self._booking_or_404(session, offer.booking_id, lock=True)
        if not await self._resolve_open_offer(session, offer, OfferResponse.REJECTED, "REJECT"):
            await session.refresh(offer)
            return await self._settled_result(session, offer, "REJECT", booking.status)
        await session.execute(
            update(MatchingMetrics)
            .where(MatchingMetrics.booking_id == booking.id)
            .values(total_drivers_responded=MatchingMetrics.total_drivers_responded + 1)
        )
        phone = await session.scalar(select(Driver.phone).where(Driver.id == offer.driver_id))
        await outbox.cancel(
            session,
            [
                Cancellation(
                    "driver answered",
                    (Category.DRIVER_OFFER,),
                    subject=_booking_topic(booking.id),
                    recipients=(phone,),
                )
            ],
        )
        events.append(
            session,
            _booking_topic(booking.id),
            "OfferRejected",
            {"driver_id": offer.driver_id, "offer_id": offer.id},
        )
        metrics.OFFER_OUTCOMES.labels(OfferResponse.REJECTED.value).inc()
        if booking.status == BookingStatus.SEARCHING and not await self._open_offers(session, booking.id):
            booking.next_wave_at = now  # everyone said no: escalate at the next sweep, not in 30 s
        return ResponseResult(True, Action.REJECTED, booking.id, offer.driver_id)

    async def _accept(
        self, session: AsyncSession, offer: BookingOffer, status: str, version: int
    ) -> ResponseResult:
        """The race: one conditional UPDATE on the booking decides (DESIGN.md, idea 2).

        Losing it writes nothing but the driver's answer. The rarer refusals that come after the booking
        was updated (the sweeper expired the offer a moment ago; the driver already holds a booking)
        raise :class:`_Abort`, which rolls the whole transaction back.
        """
        now = _now(session)
        booking_id, driver_id = offer.booking_id, offer.driver_id
        if status != BookingStatus.SEARCHING:  # decided already: no need to try the update
            await self._record_answer(session, offer, "ACCEPT")
            return ResponseResult(False, _action_for(status), booking_id, driver_id)
        try:
            won = await session.execute(
                update(Booking)
                .where(
                    Booking.id == booking_id,
                    Booking.status == BookingStatus.SEARCHING.value,
                    Booking.version == version,
                    Booking.search_deadline_at > now,
                )
                .values(
                    status=BookingStatus.ASSIGNED.value,
                    driver_id=driver_id,
                    version=Booking.version + 1,
                    assigned_at=now,
                    next_wave_at=None,
                    updated_at=now,
                )
            )
        except IntegrityError:  # the partial unique index: this driver already holds an ASSIGNED booking
            raise _Abort(Action.DRIVER_BUSY) from None
        if won.rowcount != 1:
            status = await session.scalar(select(Booking.status).where(Booking.id == booking_id))
            # still SEARCHING: its 5 minutes ran out and the sweeper has not closed it yet
            action = Action.OFFER_EXPIRED if status == BookingStatus.SEARCHING else _action_for(status)
            await self._record_answer(session, offer, "ACCEPT")
            if action is Action.ALREADY_TAKEN:
                log.warning(
                    "race lost", booking_id=booking_id, driver_id=driver_id, booking_status="ALREADY_ASSIGNED"
                )
            return ResponseResult(False, action, booking_id, driver_id)
        if not await self._resolve_open_offer(session, offer, OfferResponse.ACCEPTED, "ACCEPT"):
            # the sweeper expired this offer a moment ago
            raise _Abort(Action.OFFER_EXPIRED)
        driver_free = await session.execute(
            update(Driver)
            .where(Driver.id == driver_id, Driver.current_booking_id.is_(None))
            .values(
                status=DriverStatus.BUSY.value,
                current_booking_id=booking_id,
                last_seen_at=now,
                updated_at=now,
            )
        )
        if driver_free.rowcount != 1:
            raise _Abort(Action.DRIVER_BUSY)
        await self._after_assignment(session, booking_id, driver_id, offer.id)
        return ResponseResult(True, Action.ASSIGNED, booking_id, driver_id)

    async def _after_assignment(
        self, session: AsyncSession, booking_id: str, driver_id: str, offer_id: str
    ) -> None:
        """The winner's side effects: close other offers, tell everyone, record metrics and events."""
        now = _now(session)
        booking = await self._booking_or_404(session, booking_id)
        await session.refresh(booking)
        taken = await self._close_offers(session, booking_id, OfferResponse.TAKEN, except_offer=offer_id)
        timed_out = await session.scalars(
            select(BookingOffer.driver_id).where(
                BookingOffer.booking_id == booking_id, BookingOffer.response == OfferResponse.TIMEOUT.value
            )
        )
        driver = await self._driver_or_404(session, driver_id)
        topic = _booking_topic(booking_id)
        # Moot now, cancelled with the change that makes them so: this booking's unsent offers, the
        # winner's unsent offers for other bookings (a busy driver cannot take them), and the customer's
        # "recherche en cours" if it has not left yet.
        await outbox.cancel(
            session,
            [
                Cancellation("booking assigned", (Category.DRIVER_OFFER,), subject=topic),
                Cancellation("driver busy", (Category.DRIVER_OFFER,), recipients=(driver.phone,)),
                Cancellation("driver found", (Category.CUSTOMER_SEARCH_STARTED,), subject=topic),
            ],
        )
        # Drivers who saw the offer (open or timed out) learn it is gone; those who refused, and those
        # whose offer never left the outbox, do not.
        told = sorted({*taken, *timed_out.all()})
        handed = await outbox.handed_recipients(session, subject=topic, category=Category.DRIVER_OFFER)
        metrics.OFFER_OUTCOMES.labels(OfferResponse.ACCEPTED.value).inc()
        started = booking.search_started_at or now
        time_to_match = (now - started).total_seconds()
        await session.execute(
            update(MatchingMetrics)
            .where(MatchingMetrics.booking_id == booking_id)
            .values(
                total_drivers_responded=MatchingMetrics.total_drivers_responded + 1,
                accepted_at=now,
                time_to_match_s=time_to_match,
                final_status=FinalStatus.MATCHED.value,
            )
        )
        trip = messages.trip_line(booking)
        await outbox.enqueue(
            session,
            [
                Message(
                    recipient=booking.customer_phone,
                    category=Category.CUSTOMER_DRIVER_FOUND,
                    body=messages.driver_found(driver),
                    subject=topic,
                ),
                *(
                    Message(
                        recipient=phone,
                        category=Category.OFFER_TAKEN,
                        body=messages.booking_taken(booking),
                        subject=topic,
                        payload={"booking_id": booking_id, "trip": trip},
                        expires_at=now + timedelta(seconds=self.config.offer_timeout_s),  # never late
                    )
                    for phone in (await self._phones(session, told) if told else [])
                    if phone in handed
                ),
            ],
        )
        assigned = {
            "booking_id": booking_id,
            "driver_id": driver_id,
            "version": booking.version,
            "status": booking.status,
        }
        events.append(session, _booking_topic(booking_id), "BookingAssigned", assigned)
        events.append(session, _driver_topic(driver_id), "BookingAssigned", assigned)
        for other in taken:
            events.append(session, _driver_topic(other), "OfferTaken", {"booking_id": booking_id})
        metrics.TIME_TO_MATCH.observe(time_to_match)
        metrics.BOOKINGS_FINISHED.labels(FinalStatus.MATCHED.value).inc()
        log.info(
            "booking assigned", booking_id=booking_id, driver_id=driver_id, time_to_match_s=time_to_match
        )

    async def _open_offers(self, session: AsyncSession, booking_id: str) -> int:
        count = await session.scalar(
            select(func.count())
            .select_from(BookingOffer)
            .where(BookingOffer.booking_id == booking_id, BookingOffer.response.is_(None))
        )
        return int(count or 0)

    async def _expire_offers(self, session: AsyncSession, offer_ids: Sequence[str]) -> int:
        """Seed 000 §4 handleDriverTimeout for these offers: open → TIMEOUT, metrics and events, for the
        rows this statement actually closed (RETURNING), never for one closed meanwhile by someone else."""
        if not offer_ids:
            return 0
        rows = (
            await session.execute(
                update(BookingOffer)
                .where(BookingOffer.id.in_(offer_ids), BookingOffer.response.is_(None))
                .values(response=OfferResponse.TIMEOUT.value)
                .returning(BookingOffer.id, BookingOffer.booking_id, BookingOffer.driver_id)
                .execution_options(synchronize_session=False)
            )
        ).all()
        if not rows:
            return 0
        per_booking: dict[str, int] = {}
        for row in rows:
            per_booking[row.booking_id] = per_booking.get(row.booking_id, 0) + 1
            events.append(
                session, _driver_topic(row.driver_id), "OfferTimedOut", {"booking_id": row.booking_id}
            )
        for booking_id in sorted(per_booking):  # a fixed order: two sweepers never deadlock
            await session.execute(
                update(MatchingMetrics)
                .where(MatchingMetrics.booking_id == booking_id)
                .values(total_timeouts=MatchingMetrics.total_timeouts + per_booking[booking_id])
            )
        metrics.OFFER_OUTCOMES.labels(OfferResponse.TIMEOUT.value).inc(len(rows))
        log.warning("driver timeout", offers=len(rows), bookings=len(per_booking))
        return len(rows)

    @retry_transient
    async def cancel(self, booking_id: str, reason: str) -> Booking:
        """Seed 000 §2.1 cancelMatching: cancel a PENDING, SEARCHING or ASSIGNED booking.

        Open offers become CANCELLED and their drivers are told; no deadline of the search fires
        afterwards (every handler requires status SEARCHING or an open offer). An assigned driver is
        freed. Raises :class:`NotFound`, :class:`InvalidState` (already final).
        """
        async with self.db.transaction() as session:
            now = _now(session)
            booking = await self._booking_or_404(session, booking_id, lock=True)
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
                    finished_at=now,
                    next_wave_at=None,
                    updated_at=now,
                )
            )
            if result.rowcount != 1:
                raise InvalidState(f"booking {booking_id} changed meanwhile; read it again")
            await session.refresh(booking)
            notices: list[Message] = []
            if previous is BookingStatus.SEARCHING:
                notices += await self._close_open_offers(session, booking, tell_drivers=True)
                await outbox.cancel(session, [self._moot_on_close(booking, "booking cancelled")])
                await self._finish_metrics(session, booking_id, FinalStatus.CANCELLED)
            if previous is BookingStatus.ASSIGNED and booking.driver_id:
                driver = await self._release_driver(session, booking)
                notices.append(
                    Message(
                        recipient=driver.phone,
                        category=Category.OFFER_CANCELLED,
                        body=messages.booking_cancelled_driver(booking),
                        subject=_booking_topic(booking_id),
                        priority=Priority.NORMAL,  # their own trip, not a notice about someone else's
                    )
                )
            notices.append(
                Message(
                    recipient=booking.customer_phone,
                    category=Category.CUSTOMER_CANCELLED,
                    body=messages.booking_cancelled_customer(booking),
                    subject=_booking_topic(booking_id),
                )
            )
            await outbox.enqueue(session, notices)
            cancelled = {
                "status": booking.status,
                "version": booking.version,
                "reason": reason,
                "previous": previous,
            }
            events.append(session, _booking_topic(booking_id), "BookingCancelled", cancelled)
            if booking.driver_id:
                events.append(session, _driver_topic(booking.driver_id), "BookingCancelled", cancelled)
        log.info("booking cancelled", booking_id=booking_id, previous_status=previous.value, reason=reason)
        return booking

    @retry_transient
    async def complete(self, booking_id: str, lat: float | None = None, lon: float | None = None) -> Booking:
        """End an ASSIGNED trip: booking COMPLETED, its driver AVAILABLE again (at ``lat``/``lon`` if given).

        Raises :class:`NotFound`, :class:`InvalidState` unless ASSIGNED.
        """
        async with self.db.transaction() as session:
            now = _now(session)
            booking = await self._booking_or_404(session, booking_id, lock=True)
            if booking.status != BookingStatus.ASSIGNED:
                raise InvalidState(
                    f"booking {booking_id} is {booking.status}; only an ASSIGNED booking can complete"
                )
            booking.status = BookingStatus.COMPLETED.value
            booking.version += 1
            booking.finished_at = booking.updated_at = now
            await session.flush()
            await self._release_driver(session, booking, lat=lat, lon=lon)
            completed = {"status": booking.status, "version": booking.version, "driver_id": booking.driver_id}
            events.append(session, _booking_topic(booking_id), "BookingCompleted", completed)
            events.append(session, _driver_topic(booking.driver_id), "BookingCompleted", completed)
        return booking

    async def _release_driver(
        self, session: AsyncSession, booking: Booking, *, lat: float | None = None, lon: float | None = None
    ) -> Driver:
        now = _now(session)
        driver = await self._driver_or_404(session, booking.driver_id, lock=True)
        if driver.current_booking_id == booking.id:
            driver.current_booking_id = None
            if driver.status == DriverStatus.BUSY:
                driver.status = DriverStatus.AVAILABLE.value
        if lat is not None and lon is not None:
            driver.lat, driver.lon = lat, lon
        driver.last_seen_at = driver.updated_at = now
        await session.flush()
        events.append(session, _driver_topic(driver.id), "DriverUpdated", {"status": driver.status})
        return driver

    def _moot_on_close(self, booking: Booking, reason: str) -> Cancellation:
        """What a search ending without a driver makes moot: its unsent offers and the customer's
        "recherche en cours"."""
        moot = (Category.DRIVER_OFFER, Category.CUSTOMER_SEARCH_STARTED)
        return Cancellation(reason, moot, subject=_booking_topic(booking.id))

    async def _close_open_offers(
        self, session: AsyncSession, booking: Booking, *, tell_drivers: bool
    ) -> list[Message]:
        """Open offers → CANCELLED; return the messages telling the drivers who actually received the offer
        (when asked). The caller cancels the queued messages this makes moot (:meth:`_moot_on_close`)."""
        closed = await self._close_offers(session, booking.id, OfferResponse.CANCELLED)
        for driver_id in closed:
            events.append(session, _driver_topic(driver_id), "OfferCancelled", {"booking_id": booking.id})
        if not tell_drivers or not closed:
            return []
        topic = _booking_topic(booking.id)
        handed = await outbox.handed_recipients(session, subject=topic, category=Category.DRIVER_OFFER)
        return [
            Message(
                recipient=phone,
                category=Category.OFFER_CANCELLED,
                body=messages.booking_cancelled_driver(booking),
                subject=topic,
                payload={"booking_id": booking.id, "trip": messages.trip_line(booking)},
                # a notice about an offer: useless once the offer would have expired anyway
                expires_at=_now(session) + timedelta(seconds=self.config.offer_timeout_s),
            )
            for phone in await self._phones(session, closed)
            if phone in handed
        ]

    async def _close_offers(
        self,
        session: AsyncSession,
        booking_id: str,
        response: OfferResponse,
        *,
        except_offer: str | None = None,
    ) -> list[str]:
        """Close the booking's open offers with ``response``; return the drivers whose offer this statement
        closed (RETURNING: an offer closed meanwhile by the sweeper or a tap is not counted twice)."""
        query = update(BookingOffer).where(
            BookingOffer.booking_id == booking_id, BookingOffer.response.is_(None)
        )
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

    async def _phones(self, session: AsyncSession, driver_ids: list[str]) -> list[str]:
        rows = await session.scalars(
            select(Driver.phone).where(Driver.id.in_(driver_ids)).order_by(Driver.id)
        )
        return list(rows.all())

    async def _finish_metrics(self, session: AsyncSession, booking_id: str, final: FinalStatus) -> None:
        await session.execute(
            update(MatchingMetrics)
            .where(MatchingMetrics.booking_id == booking_id)
            .values(final_status=final.value)
        )
        metrics.BOOKINGS_FINISHED.labels(final.value).inc()

    # -------------------------------------------------------------- deadlines

    @retry_transient
    async def expire_due_offers(self, db: Database, limit: int) -> int:
        """Sweeper handler (30 s): open offers whose ``expires_at`` passed become TIMEOUT."""
        async with db.transaction() as session:
            due = await session.scalars(
                select(BookingOffer.id)
                .where(BookingOffer.response.is_(None), BookingOffer.expires_at <= _now(session))
                .order_by(BookingOffer.expires_at)
                .limit(limit)
                .with_for_update(skip_locked=True, key_share=True)
            )
            return await self._expire_offers(session, list(due.all()))

    @retry_transient
    async def expire_due_searches(self, db: Database, limit: int) -> int:
        """Sweeper handler (5 min), seed 000 §4 handleBookingTimeout.

        A SEARCHING booking past ``search_deadline_at`` → TIMEOUT; its open offers → CANCELLED; metrics
        TIMEOUT; the customer gets "aucun chauffeur disponible", every admin the alert.
        """
        async with db.transaction() as session:
            now = _now(session)
            due = list(
                (
                    await session.scalars(
                        select(Booking)
                        .where(
                            Booking.status == BookingStatus.SEARCHING.value, Booking.search_deadline_at <= now
                        )
                        .order_by(Booking.search_deadline_at)
                        .limit(limit)
                        .with_for_update(skip_locked=True, key_share=True)
                    )
                ).all()
            )
            moot: list[Cancellation] = []
            for booking in due:
                booking.status = BookingStatus.TIMEOUT.value
                booking.version += 1
                booking.finished_at = booking.updated_at = now
                booking.next_wave_at = None
                await session.flush()
                await self._close_open_offers(session, booking, tell_drivers=False)
                moot.append(self._moot_on_close(booking, "search timed out"))
                await self._finish_metrics(session, booking.id, FinalStatus.TIMEOUT)
                admins = self.config.admin_phones or ("admin",)
                await outbox.enqueue(
                    session,
                    [
                        Message(
                            recipient=booking.customer_phone,
                            category=Category.CUSTOMER_NO_DRIVER,
                            body=messages.search_failed(),
                            subject=_booking_topic(booking.id),
                        ),
                        *(
                            Message(
                                recipient=admin,
                                category=Category.ADMIN_ALERT,
                                body=messages.admin_timeout_alert(booking, self.config.search_timeout_s),
                                subject=_booking_topic(booking.id),
                            )
                            for admin in admins
                        ),
                    ],
                )
                events.append(
                    session,
                    _booking_topic(booking.id),
                    "BookingTimedOut",
                    {"status": booking.status, "version": booking.version},
                )
                log.warning("search timeout", booking_id=booking.id)  # never a customer's phone in a log
            # one call: every moot row of the batch locked in one order (no deadlock with an accept)
            await outbox.cancel(session, moot)
            return len(due)

    @retry_transient
    async def run_due_waves(self, db: Database, limit: int) -> int:
        """Sweeper handler: escalate searches whose offers are all resolved.

        A new wave goes to drivers who became available since (never twice to one driver); with
        ``max_distance_km`` the radius grows by ``escalation_radius_factor`` per wave.
        """
        async with db.transaction() as session:
            now = _now(session)
            due = list(
                (
                    await session.scalars(
                        select(Booking)
                        .where(
                            Booking.status == BookingStatus.SEARCHING.value,
                            Booking.next_wave_at <= now,
                            Booking.search_deadline_at > now,
                        )
                        .order_by(Booking.next_wave_at)
                        .limit(min(limit, 50))
                        .with_for_update(skip_locked=True, key_share=True)
                    )
                ).all()
            )
            for booking in due:
                still_open = await session.scalar(
                    select(func.max(BookingOffer.expires_at)).where(
                        BookingOffer.booking_id == booking.id, BookingOffer.response.is_(None)
                    )
                )
                if still_open is not None:
                    booking.next_wave_at = max(still_open, now)
                    continue
                options = MatchingOptions.from_json(booking.search_options)
                booking.wave += 1
                radius = None
                if options.max_distance_km is not None:
                    radius = options.max_distance_km * self.config.escalation_radius_factor ** (
                        booking.wave - 1
                    )
                candidates = await self._offer_wave(session, booking, options, radius)
                if candidates:
                    await session.execute(
                        update(MatchingMetrics)
                        .where(MatchingMetrics.booking_id == booking.id)
                        .values(
                            total_drivers_notified=MatchingMetrics.total_drivers_notified + len(candidates),
                            waves=MatchingMetrics.waves + 1,
                        )
                    )
                    events.append(
                        session,
                        _booking_topic(booking.id),
                        "SearchEscalated",
                        {"wave": booking.wave, "drivers_notified": len(candidates), "radius_km": radius},
                    )
                    log.info(
                        "search escalated", booking_id=booking.id, wave=booking.wave, drivers=len(candidates)
                    )
            return len(due)

    # ---------------------------------------------------------------- helpers

    async def _booking_or_404(self, session: AsyncSession, booking_id: str, *, lock: bool = False) -> Booking:
        query = select(Booking).where(Booking.id == booking_id).execution_options(populate_existing=True)
        if lock:
            query = lock_for_update(query)
        booking = await session.scalar(query)
        if booking is None:
            raise NotFound(f"booking {booking_id} not found", code="BOOKING_NOT_FOUND")
        return booking

    async def _driver_or_404(self, session: AsyncSession, driver_id: str, *, lock: bool = False) -> Driver:
        query = select(Driver).where(Driver.id == driver_id).execution_options(populate_existing=True)
        if lock:
            query = lock_for_update(query)
        driver = await session.scalar(query)
        if driver is None:
            raise NotFound(f"driver {driver_id} not found", code="DRIVER_NOT_FOUND")
        return driver
