"""Matching service (seed 000 §2): broadcast to every available driver, the first accept wins.

Invariants, each settled by the database (DESIGN.md, idea 2):

* exactly one driver per booking: ``UPDATE bookings SET status='ASSIGNED' … WHERE status='SEARCHING'
  AND version=:v`` decides, checked by ``rowcount``;
* one active booking per driver: ``UPDATE drivers SET current_booking_id=:b … WHERE
  current_booking_id IS NULL`` in the same transaction (savepoint), plus a partial unique index;
* deadlines are columns: ``booking_offers.expires_at`` (30 s), ``bookings.search_deadline_at`` (5 min),
  ``bookings.next_wave_at`` (escalation); :mod:`dispatchd.matching.deadlines` handles them.

Lock order, everywhere, so that PostgreSQL never deadlocks: booking → offers → metrics → driver.

:class:`MatchingService` is the facade the routers, the webhooks, the replay and the benchmarks call;
the work is in :mod:`~dispatchd.matching.drivers`, :mod:`~dispatchd.matching.broadcast` (the offer
waves), :mod:`~dispatchd.matching.answers` (the race), :mod:`~dispatchd.matching.lifecycle` (create,
relaunch, cancel, complete, time out) and :mod:`~dispatchd.matching.deadlines`. Each ``…_in`` method runs
inside a unit of work the caller owns (``async with db.transaction() as session``) and commits nothing;
the others open their own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import Database, retry_transient
from dispatchd.core.errors import Conflict
from dispatchd.matching import answers, broadcast, deadlines, drivers, lifecycle, offers
from dispatchd.matching.lookups import booking_or_404, driver_or_404
from dispatchd.matching.messages import ACTION_MESSAGES
from dispatchd.matching.models import Booking, BookingOffer, Driver, DriverStatus
from dispatchd.matching.types import (
    Action,
    Category,
    MatchingConfig,
    MatchingOptions,
    MatchingResult,
    ResponseResult,
)
from dispatchd.matching.zones import Zones

__all__ = [
    "ACTION_MESSAGES",
    "Action",
    "Category",
    "MatchingConfig",
    "MatchingOptions",
    "MatchingResult",
    "MatchingService",
    "ResponseResult",
]


class MatchingService:
    """Seed 000 §2.1 MatchingService over one :class:`Database`; durations of ``config`` in seconds."""

    def __init__(
        self, db: Database, config: MatchingConfig | None = None, zones: Zones | None = None
    ) -> None:
        self.db = db
        self.config = config or MatchingConfig()
        #: where a pickup lies, for the metrics by zone (seed 000 §6.1)
        self.zones = zones or Zones()
        #: drivers' answers to write on their offers, many per statement (see :meth:`respond`)
        self.answer_recorder = answers.AnswerRecorder(db)
        #: booking id → done when this process's accept attempt in flight on it ends (see :meth:`respond`)
        self._accepts_in_flight: dict[str, asyncio.Future[None]] = {}

    # ---------------------------------------------------------------- drivers

    async def create_driver(self, data: dict[str, Any]) -> Driver:
        """Register a driver. ``data`` as :class:`DriverCreate`; seen now (UTC), no booking.

        Raises :class:`Conflict` on a known phone.
        """
        try:
            async with self.db.transaction() as session:
                driver = await drivers.create(session, data)
        except IntegrityError:
            raise Conflict(f"a driver with phone {data.get('phone')} already exists") from None
        return driver

    async def get_driver(self, driver_id: str) -> Driver:
        """Raises :class:`NotFound` (DRIVER_NOT_FOUND)."""
        async with self.db.read() as session:
            return await driver_or_404(session, driver_id)

    async def list_drivers(self, status: DriverStatus | None = None, limit: int = 500) -> list[Driver]:
        """Drivers in creation order, optionally of one ``status``, at most ``limit``."""
        async with self.db.read() as session:
            return await drivers.list_drivers(session, status, limit)

    @retry_transient
    async def update_driver(self, driver_id: str, changes: dict[str, Any]) -> Driver:
        """Apply ``changes`` (status AVAILABLE/OFFLINE, position in WGS84 degrees, profile).

        Raises :class:`InvalidInput` for status BUSY (set by the engine only), :class:`NotFound`
        (DRIVER_NOT_FOUND), :class:`InvalidState` when a driver holding an active booking asks to become
        AVAILABLE, :class:`Conflict` when the new phone is another driver's.
        """
        drivers.check_status_change(changes)
        try:
            async with self.db.transaction() as session:
                driver = await drivers.update(session, driver_id, changes)
        except IntegrityError:
            raise Conflict(f"a driver with phone {changes.get('phone')} already exists") from None
        return driver

    @retry_transient
    async def heartbeat(self, driver_id: str, lat: float | None = None, lon: float | None = None) -> Driver:
        """Record that the driver's app is alive (``last_seen_at`` = now, UTC), optionally its position
        (both ``lat`` and ``lon``, WGS84 degrees). Raises :class:`NotFound` (DRIVER_NOT_FOUND)."""
        async with self.db.transaction() as session:
            return await drivers.heartbeat(session, driver_id, lat, lon)

    # --------------------------------------------------------------- bookings

    async def create_booking(self, data: dict[str, Any]) -> Booking:
        """Create a PENDING booking from ``data`` (see :class:`BookingCreate`)."""
        async with self.db.transaction() as session:
            return await self.create_booking_in(session, data)

    async def create_booking_in(self, session: AsyncSession, data: dict[str, Any]) -> Booking:
        """:meth:`create_booking` in the caller's unit of work."""
        return await lifecycle.create_booking(session, data)

    async def get_booking(self, booking_id: str) -> Booking:
        """Raises :class:`NotFound` (BOOKING_NOT_FOUND)."""
        async with self.db.read() as session:
            return await booking_or_404(session, booking_id)

    async def list_offers(self, booking_id: str) -> list[BookingOffer]:
        """Every offer of the booking, oldest first. Raises :class:`NotFound` (BOOKING_NOT_FOUND)."""
        async with self.db.read() as session:
            return await offers.list_offers(session, booking_id)

    async def open_offers_of(self, session: AsyncSession, driver_id: str) -> list[BookingOffer]:
        """The offers ``driver_id`` can still answer, in the caller's session: no response yet, not
        expired at ``session.info["now"]`` (``expires_at`` > now, UTC), on a booking still SEARCHING;
        oldest first. An unknown driver has none (no error)."""
        return await offers.open_offers_of(session, driver_id)

    # --------------------------------------------------------------- matching

    @retry_transient
    async def start_matching(self, booking_id: str, options: MatchingOptions | None = None) -> MatchingResult:
        """Seed 000 §2.3 startMatching in a transaction of its own: see :meth:`start_matching_in`."""
        async with self.db.transaction() as session:
            return await self.start_matching_in(session, booking_id, options)

    async def start_matching_in(
        self, session: AsyncSession, booking_id: str, options: MatchingOptions | None = None
    ) -> MatchingResult:
        """Seed 000 §2.3 startMatching: offer a PENDING booking to every available driver at once.

        Writes, in the caller's unit of work, the booking's SEARCHING state and deadlines (search:
        ``search_timeout_s``, offers: ``offer_timeout_s``), one offer per driver (no cap), each driver's
        offer message, the customer's "recherche en cours" message, the metrics row and the events
        (``MatchingStarted``, ``OfferSent``). Nobody available is not an error: ``errors`` says so and
        the search retries in waves. Raises :class:`NotFound` (BOOKING_NOT_FOUND), :class:`InvalidState`
        when the booking is not PENDING, :class:`InvalidInput` when distance options need a pickup
        position it lacks.
        """
        return await broadcast.start_matching(session, self.config, booking_id, options or MatchingOptions())

    async def relaunch_in(self, session: AsyncSession, booking_id: str) -> MatchingResult:
        """Seed 000 §4 handleBookingTimeout step 5 and §7.1: the customer answers *1* "Réessayer
        maintenant" to "aucun chauffeur disponible".

        For a booking whose search ended TIMEOUT, create a new booking with the same customer and trip
        (every column a booking is created from) and start its search with the same options
        (``search_options``), in the caller's unit of work; ``BookingRelaunched`` (``new_booking_id``)
        on the old booking's topic. Returns the new search's result (``booking`` is the new booking).
        Raises :class:`NotFound` (BOOKING_NOT_FOUND), :class:`InvalidState` when the booking is not
        TIMEOUT or was already relaunched, :class:`InvalidInput` as :meth:`start_matching_in`.
        """
        return await lifecycle.relaunch(session, self.config, booking_id)

    @retry_transient
    async def respond(self, booking_id: str, driver_id: str, answer: str) -> ResponseResult:
        """Seed 000 §2.3 handleDriverResponse on its own: the answers and errors of :meth:`respond_in`.

        The hot path of an accept race (issue 11): an answer that one read settles (the offer is already
        closed: the loser of a race, a repeat, a late tap) takes no write transaction (no writer lock on
        SQLite); an ACCEPT waits while another ACCEPT on the same booking is in flight in this process,
        then reads (across processes the database still decides: the conditional UPDATE). The only write
        left for a loser, its answer on its offer, goes through :attr:`answer_recorder` (group commit) and
        is committed before this returns.
        """
        while True:
            if answer == "ACCEPT" and (in_flight := self._accepts_in_flight.get(booking_id)) is not None:
                await asyncio.shield(in_flight)
                continue
            async with self.db.read() as session:
                decided = await answers.decide_from_read(session, booking_id, driver_id, answer)
            if decided is not None:
                result, record = decided
                break
            if answer != "ACCEPT":
                result, record = await self._respond_writing(booking_id, driver_id, answer)
                break
            if booking_id in self._accepts_in_flight:  # another ACCEPT started during the read
                continue
            gate = asyncio.get_running_loop().create_future()
            self._accepts_in_flight[booking_id] = gate
            try:
                result, record = await self._respond_writing(booking_id, driver_id, answer)
            finally:
                del self._accepts_in_flight[booking_id]
                gate.set_result(None)
            break
        if record is not None:
            await self.answer_recorder.record(record)
        return result

    async def _respond_writing(
        self, booking_id: str, driver_id: str, answer: str
    ) -> tuple[ResponseResult, answers.AnswerRecord | None]:
        """:func:`answers.respond` in a transaction of its own, the driver's answer deferred: the result,
        and the answer still to record (written by nothing in this transaction)."""
        deferred: list[answers.AnswerRecord] = []
        try:
            async with self.db.transaction() as session:
                result = await answers.respond(
                    session, self.config, booking_id, driver_id, answer, deferred=deferred
                )
        except answers._Abort as lost:  # rolled back whole: the driver's answer is all that is left
            return ResponseResult(False, lost.action, booking_id, driver_id), lost.record
        return result, deferred[0] if deferred else None

    async def respond_in(
        self, session: AsyncSession, booking_id: str, driver_id: str, answer: str
    ) -> ResponseResult:
        """Seed 000 §2.3 handleDriverResponse: ``answer`` is ``"ACCEPT"`` or ``"REJECT"``.

        Exactly one ACCEPT per booking gets ``ASSIGNED``; the rest get ``ALREADY_TAKEN``, or
        ``BOOKING_CANCELLED`` / ``OFFER_EXPIRED`` (the offer's 30 s or the search's 5 min passed) /
        ``DRIVER_BUSY``. Repeating an answer repeats its result. Works in the caller's unit of work; the
        accept attempt runs in a savepoint, so a lost race rolls back only its own writes and then
        records the driver's answer. Raises :class:`NotFound` (BOOKING_NOT_FOUND, OFFER_NOT_FOUND).
        """
        return await answers.respond(session, self.config, booking_id, driver_id, answer)

    @retry_transient
    async def cancel(self, booking_id: str, reason: str) -> Booking:
        """Seed 000 §2.1 cancelMatching: cancel a PENDING, SEARCHING or ASSIGNED booking.

        Open offers become CANCELLED and their drivers are told; no deadline of the search fires
        afterwards (every handler requires status SEARCHING or an open offer). An assigned driver is
        freed. Raises :class:`NotFound`, :class:`InvalidState` (already final).
        """
        async with self.db.transaction() as session:
            return await lifecycle.cancel(session, self.config, booking_id, reason)

    @retry_transient
    async def complete(self, booking_id: str, lat: float | None = None, lon: float | None = None) -> Booking:
        """End an ASSIGNED trip: booking COMPLETED, its driver AVAILABLE again (at ``lat``/``lon``, WGS84
        degrees, if given).

        Raises :class:`NotFound`, :class:`InvalidState` unless ASSIGNED.
        """
        async with self.db.transaction() as session:
            return await lifecycle.complete(session, booking_id, lat, lon)

    # -------------------------------------------------------------- deadlines

    @retry_transient
    async def expire_due_offers(self, db: Database, limit: int) -> int:
        """Sweeper handler (30 s), seed 000 §4 handleDriverTimeout: open offers whose ``expires_at``
        passed become TIMEOUT (at most ``limit``); returns how many."""
        async with db.transaction() as session:
            return await deadlines.expire_due_offers(session, limit)

    @retry_transient
    async def expire_due_searches(self, db: Database, limit: int) -> int:
        """Sweeper handler (5 min), seed 000 §4 handleBookingTimeout.

        A SEARCHING booking past ``search_deadline_at`` → TIMEOUT; its open offers → CANCELLED; metrics
        TIMEOUT; the customer gets "aucun chauffeur disponible", every admin the alert. At most
        ``limit``; returns how many.
        """
        async with db.transaction() as session:
            return await deadlines.expire_due_searches(session, self.config, limit)

    @retry_transient
    async def run_due_waves(self, db: Database, limit: int) -> int:
        """Sweeper handler: escalate searches whose offers are all resolved.

        A new wave goes to drivers who became available since (never twice to one driver); with
        ``max_distance_km`` the radius grows by ``escalation_radius_factor`` per wave. Returns how many
        searches were due.
        """
        async with db.transaction() as session:
            return await deadlines.run_due_waves(session, self.config, limit)
