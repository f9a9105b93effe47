"""Drivers' answers (seed 000 §2.3 handleDriverResponse and attemptBookingAssignment): a REJECT is
recorded, an ACCEPT races, and exactly one ACCEPT per booking wins (DESIGN.md, idea 2).

:func:`respond` works inside the caller's unit of work. The accept attempt runs in a savepoint: the rare
refusals that come after the booking row was updated (:class:`_Abort`) roll back that attempt only, and
the driver's answer is then recorded in the same unit of work.

The hot path (issue 11) is :func:`decide_from_read` + :func:`respond` with ``deferred=True`` +
:class:`AnswerRecorder`, used by :meth:`dispatchd.matching.service.MatchingService.respond`: an answer to an
offer that is already closed (the loser of an accept race: the winner's transaction closed its offer
TAKEN) is decided by one read, without a write transaction (no writer lock on SQLite); the only thing
left to write, the driver's answer on its offer (``responded_at``, ``driver_answer``,
``response_time_ms``: docs/operations.md reads them), is an :class:`AnswerRecord` that the recorder
writes for all concurrent answers in one statement (group commit) before each gets its reply.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, metrics, topics
from dispatchd.core.db import Database, retry_transient, savepoint
from dispatchd.core.errors import NotFound
from dispatchd.core.logging import get_logger
from dispatchd.matching import messages
from dispatchd.matching.lookups import booking_or_404, driver_or_404, now, phones
from dispatchd.matching.models import (
    Booking,
    BookingOffer,
    BookingStatus,
    Driver,
    DriverStatus,
    FinalStatus,
    MatchingMetrics,
    OfferResponse,
)
from dispatchd.matching.offers import close_offers, expire_offers, open_offer_count
from dispatchd.matching.types import Action, Category, MatchingConfig, ResponseResult
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Cancellation, Message

log = get_logger("dispatchd.matching")


class _Abort(Exception):
    """Rolls back the accept savepoint (or, deferred, the whole unit of work); carries the answer to
    give, and the driver's answer to record (None for DRIVER_BUSY)."""

    def __init__(self, action: Action, record: AnswerRecord | None = None) -> None:
        self.action = action
        self.record = record


@dataclass(frozen=True)
class AnswerRecord:
    """A driver's answer to write on its offer when none is recorded yet: ``responded_at`` (UTC, when the
    server read the answer), ``response_time_ms`` (ms since the offer was sent, server clock)."""

    offer_id: str
    driver_answer: str
    responded_at: datetime
    response_time_ms: int


_OFFERS = BookingOffer.__table__
#: One prepared statement for many records (executemany): the first answer of each offer is kept.
_RECORD_ANSWERS = (
    update(_OFFERS)
    .where(_OFFERS.c.id == bindparam("b_offer_id"), _OFFERS.c.responded_at.is_(None))
    .values(
        responded_at=bindparam("b_responded_at"),
        driver_answer=bindparam("b_driver_answer"),
        response_time_ms=bindparam("b_response_time_ms"),
    )
)


async def write_answer_records(session: AsyncSession, records: list[AnswerRecord]) -> None:
    """Write these drivers' answers on their offers (each only if the offer has none yet), in one
    executemany of one prepared UPDATE."""
    if not records:
        return
    await session.execute(
        _RECORD_ANSWERS,
        [
            {
                "b_offer_id": r.offer_id,
                "b_responded_at": r.responded_at,
                "b_driver_answer": r.driver_answer,
                "b_response_time_ms": r.response_time_ms,
            }
            for r in records
        ],
    )


class AnswerRecorder:
    """Group commit of :class:`AnswerRecord` s: :meth:`record` returns once the record is committed; the
    records that arrive while one write is in flight are written together by the next one (one
    transaction, one executemany). A failed write raises in every caller of its batch."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pending: list[tuple[AnswerRecord, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, record: AnswerRecord) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_all())
        await future

    async def _write_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._write([record for record, _ in batch])
            except Exception as exc:  # every caller of the batch hears of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    @retry_transient
    async def _write(self, records: list[AnswerRecord]) -> None:
        async with self.db.transaction() as session:
            await write_answer_records(session, records)


def _action_for(booking_status: str) -> Action:
    """What an ACCEPT gets once the booking has left SEARCHING."""
    if booking_status == BookingStatus.CANCELLED:
        return Action.BOOKING_CANCELLED
    if booking_status == BookingStatus.TIMEOUT:
        return Action.OFFER_EXPIRED
    return Action.ALREADY_TAKEN


def _elapsed_ms(session: AsyncSession, offer: BookingOffer) -> int:
    """Server-measured response time (ms): the server clock is the authority, not the app's."""
    return int((now(session) - offer.sent_at).total_seconds() * 1000)


def _settled(
    response: str, answer: str, booking_status: str, booking_id: str, driver_id: str
) -> ResponseResult:
    """The answer for an offer that is already resolved (a repeat, or a late tap), pure."""
    action = {
        OfferResponse.ACCEPTED: Action.ASSIGNED,
        OfferResponse.REJECTED: Action.REJECTED,
        OfferResponse.TIMEOUT: Action.OFFER_EXPIRED,
        OfferResponse.TAKEN: Action.ALREADY_TAKEN,
    }.get(OfferResponse(response))
    if action is None:  # CANCELLED: by a cancel, or by the end of the search
        action = _action_for(booking_status)
    success = action in (Action.ASSIGNED, Action.REJECTED) and (
        (action is Action.ASSIGNED) == (answer == "ACCEPT")
    )
    return ResponseResult(success, action, booking_id, driver_id)


async def decide_from_read(
    session: AsyncSession, booking_id: str, driver_id: str, answer: str
) -> tuple[ResponseResult, AnswerRecord | None] | None:
    """The answer when one read settles it, in a read-only session: the offer is already closed (TAKEN
    by the race's winner, ACCEPTED, REJECTED, TIMEOUT, CANCELLED), or it is an ACCEPT on an open offer
    of a booking that left SEARCHING. Returns ``(result, record)`` where ``record`` is the driver's
    answer still to write (None when the offer has one), or None when the write path must decide (an
    open offer: the race itself, a REJECT, an expiry; or an unknown booking or offer, for its 404)."""
    row = (
        await session.execute(
            select(
                _OFFERS.c.id,
                _OFFERS.c.response,
                _OFFERS.c.responded_at,
                _OFFERS.c.sent_at,
                _OFFERS.c.expires_at,
                Booking.__table__.c.status,
            )
            .join(Booking.__table__, Booking.__table__.c.id == _OFFERS.c.booking_id)
            .where(_OFFERS.c.booking_id == booking_id, _OFFERS.c.driver_id == driver_id)
        )
    ).first()
    if row is None:
        return None
    offer_id, response, responded_at, sent_at, expires_at, status = row
    at = now(session)
    if response is not None:
        result = _settled(response, answer, status, booking_id, driver_id)
    elif answer == "ACCEPT" and status != BookingStatus.SEARCHING and at < expires_at:
        result = ResponseResult(False, _action_for(status), booking_id, driver_id)
    else:
        return None
    if responded_at is not None:
        return result, None
    elapsed_ms = int((at - sent_at).total_seconds() * 1000)
    return result, AnswerRecord(offer_id, answer, at, elapsed_ms)


async def respond(
    session: AsyncSession,
    config: MatchingConfig,
    booking_id: str,
    driver_id: str,
    answer: str,
    *,
    deferred: list[AnswerRecord] | None = None,
) -> ResponseResult:
    """Seed 000 §2.3 handleDriverResponse in the caller's unit of work: see
    :meth:`dispatchd.matching.service.MatchingService.respond_in`.

    With ``deferred`` (a list), an outcome that only records the driver's answer (a settled offer, a
    lost race) writes nothing: the :class:`AnswerRecord` is appended to ``deferred`` for the caller to
    write after this unit of work (:class:`AnswerRecorder`); and the accept attempt runs without a
    savepoint: a refusal after the booking row was updated raises :class:`_Abort` (carrying the record)
    out of the unit of work, which the caller rolls back whole."""
    offer, status, version = await _offer_with_booking(session, booking_id, driver_id)
    if offer.response is not None:
        if deferred is not None:
            result = _settled(offer.response, answer, status, booking_id, driver_id)
            if offer.responded_at is None:
                deferred.append(_record_of(session, offer, answer))
            return result
        return await _settled_result(session, offer, answer, status)
    if now(session) >= offer.expires_at:
        await booking_or_404(session, booking_id, lock=True)  # lock order: booking first
        await expire_offers(session, [offer.id])
        await _record_answer(session, offer, answer)
        return ResponseResult(False, Action.OFFER_EXPIRED, booking_id, driver_id)
    if answer == "REJECT":
        return await _reject(session, offer)
    if deferred is not None:
        return await _accept(session, config, offer, status, version, deferred=deferred)
    try:
        async with savepoint(session):
            return await _accept(session, config, offer, status, version)
    except _Abort as lost:
        # Everything the attempt wrote is rolled back; the driver's answer is kept.
        offer, _, _ = await _offer_with_booking(session, booking_id, driver_id)
        await booking_or_404(session, booking_id)  # rows the attempt touched, as the database has them
        await driver_or_404(session, driver_id)
        if lost.action is not Action.DRIVER_BUSY:
            await _record_answer(session, offer, "ACCEPT")
        return ResponseResult(False, lost.action, booking_id, driver_id)


async def _offer_with_booking(
    session: AsyncSession, booking_id: str, driver_id: str
) -> tuple[BookingOffer, str, int]:
    """The driver's offer (fresh) with its booking's ``(status, version)``, in one query. Raises
    :class:`NotFound` (BOOKING_NOT_FOUND, OFFER_NOT_FOUND)."""
    row = (
        await session.execute(
            select(BookingOffer, Booking.status, Booking.version)
            .join(Booking, Booking.id == BookingOffer.booking_id)
            .where(BookingOffer.booking_id == booking_id, BookingOffer.driver_id == driver_id)
            .execution_options(populate_existing=True)
        )
    ).first()
    if row is None:
        await booking_or_404(session, booking_id)
        raise NotFound(f"driver {driver_id} has no offer for booking {booking_id}", code="OFFER_NOT_FOUND")
    return row[0], row[1], row[2]


async def _settled_result(
    session: AsyncSession, offer: BookingOffer, answer: str, booking_status: str
) -> ResponseResult:
    """The answer for an offer that is already resolved (a repeat, or a late tap)."""
    await _record_answer(session, offer, answer)
    return _settled(offer.response, answer, booking_status, offer.booking_id, offer.driver_id)


def _record_of(session: AsyncSession, offer: BookingOffer, answer: str) -> AnswerRecord:
    return AnswerRecord(offer.id, answer, now(session), _elapsed_ms(session, offer))


async def _resolve_open_offer(
    session: AsyncSession, offer: BookingOffer, response: OfferResponse, answer: str
) -> bool:
    """Close the offer with the driver's answer, only if it is still open; True when it was."""
    result = await session.execute(
        update(BookingOffer)
        .where(BookingOffer.id == offer.id, BookingOffer.response.is_(None))
        .values(
            response=response.value,
            driver_answer=answer,
            responded_at=now(session),
            response_time_ms=_elapsed_ms(session, offer),
        )
    )
    return result.rowcount == 1


async def _record_answer(session: AsyncSession, offer: BookingOffer, answer: str) -> None:
    """Keep the first answer a driver gave, even when it came too late to count."""
    await session.execute(
        update(BookingOffer)
        .where(BookingOffer.id == offer.id, BookingOffer.responded_at.is_(None))
        .values(responded_at=now(session), driver_answer=answer, response_time_ms=_elapsed_ms(session, offer))
    )


async def _reject(session: AsyncSession, offer: BookingOffer) -> ResponseResult:
    booking = await booking_or_404(session, offer.booking_id, lock=True)
    if not await _resolve_open_offer(session, offer, OfferResponse.REJECTED, "REJECT"):
        await session.refresh(offer)
        return await _settled_result(session, offer, "REJECT", booking.status)
    await session.execute(
        update(MatchingMetrics)
        .where(MatchingMetrics.booking_id == booking.id)
        .values(total_drivers_responded=MatchingMetrics.total_drivers_responded + 1)
    )
    phone = await session.scalar(select(Driver.phone).where(Driver.id == offer.driver_id))
    topic = topics.booking(booking.id)
    await outbox.cancel(
        session,
        [Cancellation("driver answered", (Category.DRIVER_OFFER,), subject=topic, recipients=(phone,))],
    )
    events.append(session, topic, "OfferRejected", {"driver_id": offer.driver_id, "offer_id": offer.id})
    metrics.OFFER_OUTCOMES.labels(OfferResponse.REJECTED.value).inc()
    if booking.status == BookingStatus.SEARCHING and not await open_offer_count(session, booking.id):
        booking.next_wave_at = now(session)  # everyone said no: escalate at the next sweep, not in 30 s
    return ResponseResult(True, Action.REJECTED, booking.id, offer.driver_id)


async def _accept(
    session: AsyncSession,
    config: MatchingConfig,
    offer: BookingOffer,
    status: str,
    version: int,
    *,
    deferred: list[AnswerRecord] | None = None,
) -> ResponseResult:
    """The race: one conditional UPDATE on the booking decides (DESIGN.md, idea 2).

    Losing it writes nothing but the driver's answer (and, with ``deferred``, not even that: its
    :class:`AnswerRecord` is appended there). The rarer refusals that come after the booking was
    updated (the sweeper expired the offer a moment ago; the driver already holds a booking) raise
    :class:`_Abort`, which rolls the attempt's savepoint back (or, deferred, the unit of work).
    """
    at = now(session)
    booking_id, driver_id = offer.booking_id, offer.driver_id

    async def record_answer() -> None:
        if deferred is None:
            await _record_answer(session, offer, "ACCEPT")
        elif offer.responded_at is None:
            deferred.append(_record_of(session, offer, "ACCEPT"))

    if status != BookingStatus.SEARCHING:  # decided already: no need to try the update
        await record_answer()
        return ResponseResult(False, _action_for(status), booking_id, driver_id)
    try:
        # RETURNING the row: the winner's side effects need the booking, fresh, without another read
        booking = (
            await session.execute(
                update(Booking)
                .where(
                    Booking.id == booking_id,
                    Booking.status == BookingStatus.SEARCHING.value,
                    Booking.version == version,
                    Booking.search_deadline_at > at,
                )
                .values(
                    status=BookingStatus.ASSIGNED.value,
                    driver_id=driver_id,
                    version=Booking.version + 1,
                    assigned_at=at,
                    next_wave_at=None,
                    updated_at=at,
                )
                .returning(Booking)
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()
    except IntegrityError:  # the partial unique index: this driver already holds an ASSIGNED booking
        raise _Abort(Action.DRIVER_BUSY) from None
    if booking is None:
        status, winner = (
            await session.execute(select(Booking.status, Booking.driver_id).where(Booking.id == booking_id))
        ).one()
        # still SEARCHING: its 5 minutes ran out and the sweeper has not closed it yet
        action = Action.OFFER_EXPIRED if status == BookingStatus.SEARCHING else _action_for(status)
        await record_answer()
        if action is Action.ALREADY_TAKEN:
            # seed 000 "Logs structurés": logger.error('Race condition detected', …), with both drivers
            log.error(
                "race condition detected",
                booking_id=booking_id,
                driver_id=driver_id,
                winner_driver_id=winner,
                booking_status="ALREADY_ACCEPTED",
            )
        return ResponseResult(False, action, booking_id, driver_id)
    if not await _resolve_open_offer(session, offer, OfferResponse.ACCEPTED, "ACCEPT"):
        # the sweeper expired this offer a moment ago
        raise _Abort(Action.OFFER_EXPIRED, _record_of(session, offer, "ACCEPT"))
    driver = (
        await session.execute(
            update(Driver)
            .where(Driver.id == driver_id, Driver.current_booking_id.is_(None))
            .values(
                status=DriverStatus.BUSY.value, current_booking_id=booking_id, last_seen_at=at, updated_at=at
            )
            .returning(Driver)
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if driver is None:
        raise _Abort(Action.DRIVER_BUSY)
    await after_assignment(session, config, booking_id, driver_id, offer.id, booking=booking, driver=driver)
    return ResponseResult(True, Action.ASSIGNED, booking_id, driver_id)


async def after_assignment(
    session: AsyncSession,
    config: MatchingConfig,
    booking_id: str,
    driver_id: str,
    offer_id: str,
    *,
    booking: Booking | None = None,
    driver: Driver | None = None,
) -> None:
    """The winner's side effects: close the other offers (TAKEN), cancel what became moot, tell the
    customer and the drivers who saw the offer, record metrics and ``BookingAssigned`` / ``OfferTaken``.
    ``booking`` and ``driver``, when given, are the rows as the assignment left them (else read)."""
    at = now(session)
    if booking is None:
        booking = await booking_or_404(session, booking_id)
    taken = await close_offers(session, booking_id, OfferResponse.TAKEN, except_offer=offer_id)
    timed_out = await session.scalars(
        select(BookingOffer.driver_id).where(
            BookingOffer.booking_id == booking_id, BookingOffer.response == OfferResponse.TIMEOUT.value
        )
    )
    if driver is None:
        driver = await driver_or_404(session, driver_id)
    topic = topics.booking(booking_id)
    # Moot now, cancelled with the change that makes them so: this booking's unsent offers, the
    # winner's unsent offers for other bookings (a busy driver cannot take them), and the customer's
    # "recherche en cours" if it has not left yet.
    await outbox.cancel(
        session,
        [
            Cancellation("booking assigned", (Category.DRIVER_OFFER,), subject=topic),
            Cancellation("driver busy", (Category.DRIVER_OFFER,), recipients=(driver.phone,)),
            Cancellation(
                "driver found",
                (Category.CUSTOMER_SEARCH_STARTED, Category.CUSTOMER_SEARCH_PROGRESS),
                subject=topic,
            ),
        ],
    )
    # Drivers who saw the offer (open or timed out) learn it is gone; those who refused, and those
    # whose offer never left the outbox, do not.
    told = sorted({*taken, *timed_out.all()})
    handed = await outbox.handed_recipients(session, subject=topic, category=Category.DRIVER_OFFER)
    metrics.OFFER_OUTCOMES.labels(OfferResponse.ACCEPTED.value).inc()
    started = booking.search_started_at or at
    time_to_match = (at - started).total_seconds()
    await session.execute(
        update(MatchingMetrics)
        .where(MatchingMetrics.booking_id == booking_id)
        .values(
            total_drivers_responded=MatchingMetrics.total_drivers_responded + 1,
            accepted_at=at,
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
                    expires_at=at + timedelta(seconds=config.offer_timeout_s),  # never late
                )
                for phone in (await phones(session, told) if told else [])
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
    events.append(session, topic, "BookingAssigned", assigned)
    events.append(session, topics.driver(driver_id), "BookingAssigned", assigned)
    for other in taken:
        events.append(session, topics.driver(other), "OfferTaken", {"booking_id": booking_id})
    metrics.TIME_TO_MATCH.observe(time_to_match)
    metrics.BOOKINGS_FINISHED.labels(FinalStatus.MATCHED.value).inc()
    log.info("booking assigned", booking_id=booking_id, driver_id=driver_id, time_to_match_s=time_to_match)
