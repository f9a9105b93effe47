"""The accept race's hot path (issue 11), SQLite and PostgreSQL: losers answered from a read write no
event and take no write transaction of their own (their answers are recorded together, group commit),
and exactly one of many concurrent accepts still wins, with every driver's answer recorded.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy import func, select, update

from dispatchd.core.events import Event
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus
from dispatchd.matching.types import Action
from tests.factories import create_booking, create_drivers


@contextlib.contextmanager
def counted_transactions(db):
    """Count the write transactions opened on ``db`` while the block runs."""
    opened = [0]
    original = db.transaction

    @contextlib.asynccontextmanager
    async def counting():
        opened[0] += 1
        async with original() as session:
            yield session

    db.transaction = counting
    try:
        yield opened
    finally:
        db.transaction = original


async def _event_count(services) -> int:
    async with services.db.read() as session:
        return await session.scalar(select(func.count()).select_from(Event))


async def _offers(services, booking_id: str) -> list[BookingOffer]:
    return await services.matching.list_offers(booking_id)


async def test_losers_after_the_race_write_no_event_and_share_their_transactions(services, clock):
    matching = services.matching
    drivers = await create_drivers(services, 31)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    clock.advance(2.5)
    assert (await matching.respond(booking.id, drivers[0].id, "ACCEPT")).action is Action.ASSIGNED
    events_before = await _event_count(services)

    with counted_transactions(services.db) as opened:
        results = await asyncio.gather(*(matching.respond(booking.id, d.id, "ACCEPT") for d in drivers[1:]))

    assert [r.action for r in results] == [Action.ALREADY_TAKEN] * 30
    assert not any(r.success for r in results)
    assert await _event_count(services) == events_before  # a loser writes no event
    assert opened[0] < 30 // 2  # the answers' records, many per transaction (per loser: 30)
    offers = {o.driver_id: o for o in await _offers(services, booking.id)}
    for driver in drivers[1:]:
        offer = offers[driver.id]
        # the answer is recorded all the same, with the server's time (docs/operations.md reads it)
        assert (offer.response, offer.driver_answer, offer.response_time_ms) == ("TAKEN", "ACCEPT", 2500)
        assert offer.responded_at is not None


async def test_a_repeated_answer_is_answered_from_a_read_without_any_write(services):
    matching = services.matching
    winner, loser = await create_drivers(services, 2)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    assert (await matching.respond(booking.id, winner.id, "ACCEPT")).action is Action.ASSIGNED
    assert (await matching.respond(booking.id, loser.id, "ACCEPT")).action is Action.ALREADY_TAKEN

    with counted_transactions(services.db) as opened:
        again = [await matching.respond(booking.id, d.id, "ACCEPT") for d in (winner, loser)]

    assert [(r.success, r.action) for r in again] == [(True, Action.ASSIGNED), (False, Action.ALREADY_TAKEN)]
    assert opened[0] == 0


async def test_many_concurrent_accepts_one_winner_every_answer_recorded(services, clock):
    matching = services.matching
    drivers = await create_drivers(services, 40)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    clock.advance(1.0)
    events_before = await _event_count(services)

    results = await asyncio.gather(*(matching.respond(booking.id, d.id, "ACCEPT") for d in drivers))

    winners = [r for r in results if r.action is Action.ASSIGNED]
    assert len(winners) == 1 and winners[0].success
    assert all(r.action is Action.ALREADY_TAKEN for r in results if r is not winners[0])
    offers = await _offers(services, booking.id)
    assert sorted(o.response for o in offers) == ["ACCEPTED"] + ["TAKEN"] * 39
    assert all(o.driver_answer == "ACCEPT" and o.response_time_ms == 1000 for o in offers)
    booking_now = await matching.get_booking(booking.id)
    assert (booking_now.status, booking_now.driver_id) == ("ASSIGNED", winners[0].driver_id)
    async with services.db.read() as session:
        kinds = (await session.scalars(select(Event.type).where(Event.id > 0).order_by(Event.id))).all()
    new = kinds[-(await _event_count(services) - events_before) :]
    # the winner's events only: BookingAssigned on two topics and OfferTaken to each loser
    assert sorted(set(new)) == ["BookingAssigned", "OfferTaken"]
    assert new.count("OfferTaken") == 39


async def test_a_failed_answer_write_fails_every_answer_of_its_batch_then_the_next_batch_works(
    services, monkeypatch
):
    from dispatchd.matching import answers

    matching = services.matching
    drivers = await create_drivers(services, 4)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    assert (await matching.respond(booking.id, drivers[0].id, "ACCEPT")).action is Action.ASSIGNED
    real_write = answers.write_answer_records

    async def broken(session, records):
        raise RuntimeError("disk full")

    monkeypatch.setattr(answers, "write_answer_records", broken)
    failed = await asyncio.gather(
        *(matching.respond(booking.id, d.id, "ACCEPT") for d in drivers[1:3]), return_exceptions=True
    )
    assert [str(f) for f in failed] == ["disk full", "disk full"]
    monkeypatch.setattr(answers, "write_answer_records", real_write)

    retried = [await matching.respond(booking.id, d.id, "ACCEPT") for d in drivers[1:]]

    assert [r.action for r in retried] == [Action.ALREADY_TAKEN] * 3
    offers = {o.driver_id: o for o in await _offers(services, booking.id)}
    assert all(offers[d.id].driver_answer == "ACCEPT" for d in drivers)


async def test_an_accept_on_an_open_offer_of_a_cancelled_booking_is_answered_from_the_read(services):
    matching = services.matching
    [driver] = await create_drivers(services, 1)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    async with services.db.transaction() as session:  # cancelled by hand, its offer left open
        await session.execute(
            update(Booking).where(Booking.id == booking.id).values(status=BookingStatus.CANCELLED.value)
        )

    with counted_transactions(services.db) as opened:
        result = await matching.respond(booking.id, driver.id, "ACCEPT")

    assert (result.success, result.action) == (False, Action.BOOKING_CANCELLED)
    assert opened[0] == 1  # the answer's record only
    [offer] = await _offers(services, booking.id)
    assert (offer.response, offer.driver_answer) == (None, "ACCEPT")
