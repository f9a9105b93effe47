"""The in-session entry points of matching (``…_in``): they run inside a unit of work the caller owns, as
the inbound WhatsApp handlers do. SQLite and PostgreSQL, clock moved by hand."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from dispatchd.core import events, topics
from dispatchd.core.errors import InvalidState, NotFound
from dispatchd.matching import answers
from dispatchd.matching.models import Booking, BookingOffer, Driver
from dispatchd.matching.service import Action, MatchingOptions
from dispatchd.notifications import outbox
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message
from tests.conftest import booking_data
from tests.factories import create_booking, create_driver


async def _event_types(services, topic: str) -> list[str]:
    async with services.db.read() as session:
        return [e.type for e in await events.read(session, topics=[topic], limit=1000)]


async def _offer(services, booking_id: str, driver_id: str) -> BookingOffer:
    async with services.db.read() as session:
        return await session.scalar(
            select(BookingOffer).where(
                BookingOffer.booking_id == booking_id, BookingOffer.driver_id == driver_id
            )
        )


async def _caller_work(session, tag: str) -> None:
    """What an inbound handler writes before it hands the message to matching."""
    events.append(session, f"driver:caller_{tag}", "CallerWork", {})
    await outbox.enqueue(
        session, [Message(recipient="+221700000000", category="caller_note", body=tag, subject="caller")]
    )


async def _caller_work_kept(services, tag: str) -> bool:
    async with services.db.read() as session:
        note = await session.scalar(select(Notification).where(Notification.category == "caller_note"))
    return (
        note is not None
        and note.body == tag
        and "CallerWork" in await _event_types(services, f"driver:caller_{tag}")
    )


# ------------------------------------------------------------------------------------ respond_in


async def test_respond_in_a_lost_race_after_the_booking_update_rolls_back_only_the_attempt(services):
    """The booking UPDATE wins, then the driver turns out to hold a booking: the savepoint takes back the
    booking and the offer, and the caller's own work and transaction go on."""
    matching = services.matching
    driver = await create_driver(services)
    other = await create_booking(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    async with services.db.transaction() as session:  # the driver got hold of a booking meanwhile
        await session.execute(
            update(Driver).where(Driver.id == driver.id).values(current_booking_id=other.id)
        )

    async with services.db.transaction() as session:
        await _caller_work(session, "busy")
        held = await session.scalar(select(Booking).where(Booking.id == booking.id))  # the caller holds it
        held_driver = await session.scalar(select(Driver).where(Driver.id == driver.id))
        result = await matching.respond_in(session, booking.id, driver.id, "ACCEPT")
        # the session is still usable, and what it holds is what the database holds
        assert (held.status, held.version, held.driver_id) == ("SEARCHING", 2, None)
        assert (held_driver.status, held_driver.current_booking_id) == ("AVAILABLE", other.id)
        assert await session.scalar(select(Booking.version).where(Booking.id == booking.id)) == 2
        events.append(session, "driver:caller_busy", "CallerAfter", {})

    assert (result.success, result.action) == (False, Action.DRIVER_BUSY)
    assert result.message == "Vous avez déjà une course en cours."
    after = await matching.get_booking(booking.id)
    assert (after.status, after.version, after.driver_id, after.assigned_at) == ("SEARCHING", 2, None, None)
    offer = await _offer(services, booking.id, driver.id)
    assert (offer.response, offer.driver_answer, offer.responded_at) == (None, None, None)  # as respond does
    assert (await matching.get_driver(driver.id)).current_booking_id == other.id
    assert await _caller_work_kept(services, "busy")
    assert "CallerAfter" in await _event_types(services, "driver:caller_busy")
    assert "BookingAssigned" not in await _event_types(services, topics.booking(booking.id))


async def test_respond_in_survives_the_unique_index_refusing_a_second_booking(services):
    """An IntegrityError inside the savepoint (PostgreSQL aborts the statement's transaction) leaves the
    caller's transaction usable."""
    matching = services.matching
    driver = await create_driver(services)
    first, second = await create_booking(services), await create_booking(services)
    await matching.start_matching(first.id)
    await matching.start_matching(second.id)
    assert (await matching.respond(first.id, driver.id, "ACCEPT")).action is Action.ASSIGNED

    async with services.db.transaction() as session:
        await _caller_work(session, "index")
        busy = await matching.respond_in(session, second.id, driver.id, "ACCEPT")
        assert await session.scalar(select(Booking.status).where(Booking.id == second.id)) == "SEARCHING"

    assert (busy.success, busy.action) == (False, Action.DRIVER_BUSY)
    assert (await matching.get_booking(second.id)).status == "SEARCHING"
    assert (await matching.get_driver(driver.id)).current_booking_id == first.id
    assert await _caller_work_kept(services, "index")


async def test_respond_in_records_the_answer_when_the_offer_closed_under_the_accept(
    services, clock, monkeypatch
):
    """The sweeper expired the offer between the read and the accept (simulated): the booking UPDATE is
    rolled back with the savepoint, the driver's ACCEPT is kept, in the caller's transaction."""
    matching = services.matching
    driver = await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    clock.advance(4)

    async def closed_meanwhile(session, offer, response, answer):
        return False

    monkeypatch.setattr(answers, "_resolve_open_offer", closed_meanwhile)
    async with services.db.transaction() as session:
        await _caller_work(session, "expired")
        result = await matching.respond_in(session, booking.id, driver.id, "ACCEPT")

    assert (result.success, result.action) == (False, Action.OFFER_EXPIRED)
    after = await matching.get_booking(booking.id)
    assert (after.status, after.version, after.driver_id) == ("SEARCHING", 2, None)
    offer = await _offer(services, booking.id, driver.id)
    assert (offer.response, offer.driver_answer, offer.response_time_ms) == (None, "ACCEPT", 4000)
    assert (await matching.get_driver(driver.id)).current_booking_id is None
    assert await _caller_work_kept(services, "expired")


async def test_respond_in_wins_inside_the_callers_transaction_and_rolls_back_with_it(services):
    matching = services.matching
    driver = await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)

    with pytest.raises(RuntimeError):
        async with services.db.transaction() as session:
            won = await matching.respond_in(session, booking.id, driver.id, "ACCEPT")
            assert won.action is Action.ASSIGNED
            raise RuntimeError("the caller fails after")
    assert (await matching.get_booking(booking.id)).status == "SEARCHING"

    async with services.db.transaction() as session:
        won = await matching.respond_in(session, booking.id, driver.id, "ACCEPT")
    assert (won.success, won.action) == (True, Action.ASSIGNED)
    assert (await matching.get_booking(booking.id)).driver_id == driver.id
    assert "BookingAssigned" in await _event_types(services, topics.booking(booking.id))


# ------------------------------------------------------------------------------------ relaunch_in


async def _timed_out(services, clock, options: MatchingOptions | None = None, **fields) -> Booking:
    booking = await create_booking(services, **fields)
    await services.matching.start_matching(booking.id, options)
    clock.advance(services.matching.config.search_timeout_s)
    await services.sweeper.run_once()
    timed_out = await services.matching.get_booking(booking.id)
    assert timed_out.status == "TIMEOUT"
    return timed_out


async def test_relaunch_in_starts_a_new_search_for_the_same_trip_with_the_same_options(services, clock):
    matching = services.matching
    near = await create_driver(services, lat=14.6690, lon=-17.4320)
    excluded = await create_driver(services, lat=14.6685, lon=-17.4315)
    await create_driver(services, lat=14.80, lon=-17.30)  # ~19 km away
    options = MatchingOptions(max_distance_km=5, exclude_driver_ids=(excluded.id,), priority_mode="DISTANCE")
    old = await _timed_out(
        services, clock, options, customer_name="Fatou Sow", pickup_at=clock.now(), drop_address="Yoff"
    )
    clock.advance(60)

    async with services.db.transaction() as session:
        result = await matching.relaunch_in(session, old.id)

    new = await matching.get_booking(result.booking.id)
    assert new.id != old.id and new.status == "SEARCHING" and new.wave == 1
    for column in booking_data():
        assert getattr(new, column) == getattr(old, column), column
    assert new.pickup_at == old.pickup_at and new.search_options == old.search_options
    assert (result.success, result.driver_ids, result.drivers_notified) == (True, [near.id], 1)
    assert (await matching.get_booking(old.id)).status == "TIMEOUT"
    async with services.db.read() as session:
        relaunched = [
            e
            for e in await events.read(session, topics=[topics.booking(old.id)])
            if e.type == "BookingRelaunched"
        ]
        searching = await session.scalar(
            select(Notification).where(
                Notification.subject == topics.booking(new.id),
                Notification.category == "customer_search_started",
            )
        )
    assert [e.data["new_booking_id"] for e in relaunched] == [new.id]
    assert searching.recipient == old.customer_phone
    assert await _event_types(services, topics.booking(new.id)) == ["BookingCreated", "MatchingStarted"]


async def test_relaunch_in_only_a_timed_out_booking_and_only_once(services, clock):
    matching = services.matching
    await create_driver(services)
    old = await _timed_out(services, clock)
    pending = await create_booking(services)
    searching = await create_booking(services)
    await matching.start_matching(searching.id)

    for booking in (pending, searching):
        with pytest.raises(InvalidState):
            async with services.db.transaction() as session:
                await matching.relaunch_in(session, booking.id)
    with pytest.raises(NotFound) as missing:
        async with services.db.transaction() as session:
            await matching.relaunch_in(session, "bkg_missing")
    assert missing.value.code == "BOOKING_NOT_FOUND"

    async with services.db.transaction() as session:
        first = await matching.relaunch_in(session, old.id)
    with pytest.raises(InvalidState, match=first.booking.id):
        async with services.db.transaction() as session:
            await matching.relaunch_in(session, old.id)
    async with services.db.read() as session:
        copies = await session.scalars(select(Booking.id).where(Booking.customer_phone == old.customer_phone))
        assert sorted(copies.all()) == sorted([old.id, first.booking.id])


# -------------------------------------------------------------- start_matching_in, open_offers_of


async def test_create_and_start_in_commit_nothing_of_their_own(services):
    matching = services.matching
    await create_driver(services)
    data = booking_data()
    with pytest.raises(RuntimeError):
        async with services.db.transaction() as session:
            booking = await matching.create_booking_in(session, data)
            result = await matching.start_matching_in(session, booking.id)
            assert result.drivers_notified == 1 and result.booking.status == "SEARCHING"
            raise RuntimeError("the caller fails after")
    async with services.db.read() as session:
        assert (
            await session.scalar(select(Booking).where(Booking.customer_phone == data["customer_phone"]))
            is None
        )

    async with services.db.transaction() as session:
        booking = await matching.create_booking_in(session, data)
        result = await matching.start_matching_in(session, booking.id, MatchingOptions())
    assert (await matching.get_booking(booking.id)).status == "SEARCHING"
    assert result.matching_metrics_id and result.errors == []


async def test_open_offers_of_a_driver_oldest_first(services, clock):
    matching = services.matching
    driver = await create_driver(services)
    first = await create_booking(services)
    await matching.start_matching(first.id)
    clock.advance(10)
    second, rejected, cancelled = [await create_booking(services) for _ in range(3)]
    for booking in (second, rejected, cancelled):
        await matching.start_matching(booking.id)
    await matching.respond(rejected.id, driver.id, "REJECT")
    await matching.cancel(cancelled.id, "test")

    async with services.db.read() as session:
        assert [o.booking_id for o in await matching.open_offers_of(session, driver.id)] == [
            first.id,
            second.id,
        ]
        assert await matching.open_offers_of(session, "drv_unknown") == []
    clock.advance(20)  # the first offer's 30 s are over, even before the sweeper runs
    async with services.db.read() as session:
        assert [o.booking_id for o in await matching.open_offers_of(session, driver.id)] == [second.id]
