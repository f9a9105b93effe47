"""Seed 000 §"Tests et validation": the matching workflow on the service, SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import select

from dispatchd.core import events
from dispatchd.matching.models import MatchingMetrics
from dispatchd.matching.service import Action, MatchingOptions
from dispatchd.notifications.models import Notification
from tests.factories import create_booking, create_driver, create_drivers


async def _notifications(services, **filters) -> list[Notification]:
    async with services.db.read() as session:
        query = select(Notification).order_by(Notification.created_at, Notification.id)
        for name, value in filters.items():
            query = query.where(getattr(Notification, name) == value)
        return list((await session.scalars(query)).all())


async def _events(services, topic: str | None = None):
    async with services.db.read() as session:
        return await events.read(session, topics=[topic] if topic else None, limit=10_000)


async def test_all_ten_available_drivers_are_notified(services):
    matching = services.matching
    drivers = [await create_driver(services, name=f"D{i}") for i in range(10)]
    await create_driver(services, status="OFFLINE")
    booking = await create_booking(services)

    result = await matching.start_matching(booking.id)

    assert result.success and result.drivers_notified == 10
    assert sorted(result.driver_ids) == sorted(d.id for d in drivers)
    offers = await matching.list_offers(booking.id)
    assert len(offers) == 10 and all(o.response is None for o in offers)
    driver_msgs = await _notifications(services, category="driver_offer")
    assert sorted(n.recipient for n in driver_msgs) == sorted(d.phone for d in drivers)
    [customer] = await _notifications(services, category="customer_search_started")
    assert "10 chauffeurs notifiés" in customer.body and customer.recipient == booking.customer_phone
    async with services.db.read() as session:
        row = await session.scalar(select(MatchingMetrics).where(MatchingMetrics.booking_id == booking.id))
    assert row.id == result.matching_metrics_id and row.total_drivers_notified == 10
    assert (await matching.get_booking(booking.id)).status == "SEARCHING"
    offer_events = [e for e in await _events(services) if e.type == "OfferSent"]
    assert sorted(e.topic for e in offer_events) == sorted(f"driver:{d.id}" for d in drivers)


async def test_first_accept_wins_and_only_offered_drivers_hear_it_was_taken(services):
    matching = services.matching
    offered = await create_drivers(services, 3)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await services.delivery.run_once()  # the offers reach the drivers' phones
    late = await create_driver(services)  # available, but never offered this booking

    first = await matching.respond(booking.id, offered[0].id, "ACCEPT")
    second = await matching.respond(booking.id, offered[1].id, "ACCEPT")

    assert (first.success, first.action) == (True, Action.ASSIGNED)
    assert (second.success, second.action) == (False, Action.ALREADY_TAKEN)
    assert second.message == "Course déjà prise par un autre chauffeur."
    assigned = await matching.get_booking(booking.id)
    assert (assigned.status, assigned.driver_id, assigned.version) == ("ASSIGNED", offered[0].id, 3)
    winner = await matching.get_driver(offered[0].id)
    assert (winner.status, winner.current_booking_id) == ("BUSY", booking.id)
    responses = {o.driver_id: o.response for o in await matching.list_offers(booking.id)}
    assert responses == {offered[0].id: "ACCEPTED", offered[1].id: "TAKEN", offered[2].id: "TAKEN"}
    [found] = await _notifications(services, category="customer_driver_found")
    assert (
        offered[0].name in found.body and offered[0].phone in found.body and "CHAUFFEUR TROUVÉ" in found.body
    )
    taken = await _notifications(services, category="offer_taken")
    assert sorted(n.recipient for n in taken) == sorted([offered[1].phone, offered[2].phone])
    assert late.phone not in {n.recipient for n in await _notifications(services)}
    async with services.db.read() as session:
        row = await session.scalar(select(MatchingMetrics).where(MatchingMetrics.booking_id == booking.id))
    assert row.final_status == "MATCHED" and row.accepted_at is not None and row.time_to_match_s == 0


async def test_repeated_answers_repeat_their_result(services):
    matching = services.matching
    a, b = await create_drivers(services, 2)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)

    assert (await matching.respond(booking.id, b.id, "REJECT")).action is Action.REJECTED
    assert (await matching.respond(booking.id, b.id, "REJECT")).action is Action.REJECTED
    assert (await matching.respond(booking.id, a.id, "ACCEPT")).action is Action.ASSIGNED
    again = await matching.respond(booking.id, a.id, "ACCEPT")
    assert (again.success, again.action) == (True, Action.ASSIGNED)
    assert (
        len([e for e in await _events(services) if e.type == "BookingAssigned"]) == 2
    )  # booking + driver topic


async def test_busy_driver_cannot_win_a_second_booking(services):
    matching = services.matching
    driver = await create_driver(services)
    first = await create_booking(services)
    second = await create_booking(services)
    await matching.start_matching(first.id)
    await matching.start_matching(second.id)

    assert (await matching.respond(first.id, driver.id, "ACCEPT")).action is Action.ASSIGNED
    busy = await matching.respond(second.id, driver.id, "ACCEPT")

    assert (busy.success, busy.action) == (False, Action.DRIVER_BUSY)
    assert (await matching.get_booking(second.id)).status == "SEARCHING"
    assert (await matching.get_driver(driver.id)).current_booking_id == first.id


async def test_distance_mode_orders_and_filters_by_radius(services):
    matching = services.matching
    near = await create_driver(services, lat=14.6690, lon=-17.4320)
    mid = await create_driver(services, lat=14.70, lon=-17.45)
    await create_driver(services, lat=14.80, lon=-17.30)  # ~19 km away
    booking = await create_booking(services)

    result = await matching.start_matching(
        booking.id, MatchingOptions(max_distance_km=5, priority_mode="DISTANCE")
    )

    assert result.driver_ids == [near.id, mid.id]
    distances = [o.distance_km for o in await matching.list_offers(booking.id)]
    assert all(d is not None and d < 5 for d in distances)


async def test_excluded_drivers_get_no_offer(services):
    matching = services.matching
    keep, skip = await create_drivers(services, 2)
    booking = await create_booking(services)
    result = await matching.start_matching(booking.id, MatchingOptions(exclude_driver_ids=(skip.id,)))
    assert result.driver_ids == [keep.id]


async def test_complete_frees_the_driver_at_the_drop_off(services):
    matching = services.matching
    driver = await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await matching.respond(booking.id, driver.id, "ACCEPT")

    done = await matching.complete(booking.id, lat=14.67, lon=-17.07)

    assert done.status == "COMPLETED"
    freed = await matching.get_driver(driver.id)
    assert (freed.status, freed.current_booking_id, freed.lat, freed.lon) == (
        "AVAILABLE",
        None,
        14.67,
        -17.07,
    )
