"""Seed 000 §4 timeouts: 30 s offers, 5 min searches, escalation, cancel, restart (clock moved by hand)."""

from __future__ import annotations

from sqlalchemy import select

from dispatchd.app import build_services
from dispatchd.core import events
from dispatchd.matching.models import MatchingMetrics
from dispatchd.matching.service import Action, MatchingOptions
from dispatchd.notifications.models import Notification
from tests.factories import create_booking, create_driver, create_drivers


async def _metrics(services, booking_id: str) -> MatchingMetrics:
    async with services.db.read() as session:
        return await session.scalar(select(MatchingMetrics).where(MatchingMetrics.booking_id == booking_id))


async def _messages(services, category: str) -> list[Notification]:
    async with services.db.read() as session:
        return list(
            (await session.scalars(select(Notification).where(Notification.category == category))).all()
        )


async def _event_types(services, topic: str) -> list[str]:
    async with services.db.read() as session:
        return [e.type for e in await events.read(session, topics=[topic], limit=1000)]


async def test_offer_times_out_after_30_seconds_not_before(services, clock):
    matching = services.matching
    drivers = await create_drivers(services, 2)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)

    clock.advance(29)
    assert (await services.sweeper.run_once())["offer_expiry"] == 0
    clock.advance(1)
    assert (await services.sweeper.run_once())["offer_expiry"] == 2

    assert {o.response for o in await matching.list_offers(booking.id)} == {"TIMEOUT"}
    assert (await _metrics(services, booking.id)).total_timeouts == 2
    late = await matching.respond(booking.id, drivers[0].id, "ACCEPT")
    assert (late.success, late.action) == (False, Action.OFFER_EXPIRED)
    assert (await matching.get_booking(booking.id)).status == "SEARCHING"
    assert "OfferTimedOut" in await _event_types(services, f"driver:{drivers[0].id}")


async def test_answer_after_expiry_is_refused_even_before_the_sweeper_runs(services, clock):
    matching = services.matching
    driver = await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)

    clock.advance(30.5)
    result = await matching.respond(booking.id, driver.id, "ACCEPT")

    assert result.action is Action.OFFER_EXPIRED
    [offer] = await matching.list_offers(booking.id)
    assert (offer.response, offer.driver_answer, offer.response_time_ms) == ("TIMEOUT", "ACCEPT", 30500)
    assert (await matching.get_booking(booking.id)).status == "SEARCHING"


async def test_search_times_out_after_5_minutes_and_alerts_admin(services, clock):
    matching = services.matching
    driver = await create_driver(services)
    booking = await create_booking(services, customer_name="Fatou Sow")
    await matching.start_matching(booking.id)

    clock.advance(299)
    await services.sweeper.run_once()
    assert (await matching.get_booking(booking.id)).status == "SEARCHING"
    clock.advance(1)
    handled = await services.sweeper.run_once()

    assert handled["search_expiry"] == 1
    final = await matching.get_booking(booking.id)
    assert (final.status, final.version) == ("TIMEOUT", 3)
    [customer] = await _messages(services, "customer_no_driver")
    assert customer.recipient == booking.customer_phone and "AUCUN CHAUFFEUR DISPONIBLE" in customer.body
    assert "*1* - Réessayer maintenant" in customer.body
    [alert] = await _messages(services, "admin_alert")
    assert alert.recipient == "+33600000000"
    assert "ALERTE ADMIN" in alert.body and "Fatou Sow" in alert.body and booking.id in alert.body
    assert "après 5 minutes" in alert.body
    assert (await _metrics(services, booking.id)).final_status == "TIMEOUT"
    assert "BookingTimedOut" in await _event_types(services, f"booking:{booking.id}")
    late = await matching.respond(booking.id, driver.id, "ACCEPT")
    assert late.action is Action.OFFER_EXPIRED


async def test_escalation_offers_drivers_who_became_available_since(services, clock):
    matching = services.matching
    first = await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    newcomer = await create_driver(services)

    clock.advance(30)
    handled = await services.sweeper.run_once()

    assert handled["offer_expiry"] == 1 and handled["escalation"] == 1
    offers = {o.driver_id: o for o in await matching.list_offers(booking.id)}
    assert set(offers) == {first.id, newcomer.id}
    assert (offers[first.id].wave, offers[first.id].response) == (1, "TIMEOUT")
    assert (offers[newcomer.id].wave, offers[newcomer.id].response) == (2, None)
    metrics_row = await _metrics(services, booking.id)
    assert (metrics_row.total_drivers_notified, metrics_row.waves) == (2, 2)
    assert "SearchEscalated" in await _event_types(services, f"booking:{booking.id}")
    assert (await matching.respond(booking.id, newcomer.id, "ACCEPT")).action is Action.ASSIGNED


async def test_escalation_widens_the_radius(services, clock):
    matching = services.matching
    await create_driver(services, lat=14.6690, lon=-17.4320)
    far = await create_driver(services, lat=14.6681, lon=-17.3700)  # ~6.6 km east
    booking = await create_booking(services)

    result = await matching.start_matching(booking.id, MatchingOptions(max_distance_km=5))
    assert far.id not in result.driver_ids

    clock.advance(30)
    await services.sweeper.run_once()  # wave 2: radius 5 x 1.5 = 7.5 km

    offered = {o.driver_id: o.wave for o in await matching.list_offers(booking.id)}
    assert offered[far.id] == 2


async def test_everyone_rejecting_escalates_without_waiting_for_the_timeout(services, clock):
    matching = services.matching
    a, b = await create_drivers(services, 2)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await matching.respond(booking.id, a.id, "REJECT")
    await matching.respond(booking.id, b.id, "REJECT")
    newcomer = await create_driver(services)

    clock.advance(1)
    await services.sweeper.run_once()

    offered = {o.driver_id: o.response for o in await matching.list_offers(booking.id)}
    assert offered == {a.id: "REJECTED", b.id: "REJECTED", newcomer.id: None}
    assert (await _metrics(services, booking.id)).total_drivers_responded == 2


async def test_search_with_nobody_available_waits_for_a_driver(services, clock):
    matching = services.matching
    booking = await create_booking(services)
    result = await matching.start_matching(booking.id)
    assert result.drivers_notified == 0 and result.errors

    await services.sweeper.run_once()
    driver = await create_driver(services)
    clock.advance(10)
    await services.sweeper.run_once()

    assert [o.driver_id for o in await matching.list_offers(booking.id)] == [driver.id]


async def test_cancel_during_broadcast_closes_offers_and_silences_deadlines(services, clock):
    matching = services.matching
    drivers = await create_drivers(services, 3)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await services.delivery.run_once()  # the offers reach the drivers' phones
    await matching.respond(booking.id, drivers[0].id, "REJECT")

    cancelled = await matching.cancel(booking.id, "customer changed plans")

    assert (cancelled.status, cancelled.cancel_reason) == ("CANCELLED", "customer changed plans")
    responses = {o.driver_id: o.response for o in await matching.list_offers(booking.id)}
    assert responses == {drivers[0].id: "REJECTED", drivers[1].id: "CANCELLED", drivers[2].id: "CANCELLED"}
    told = sorted(n.recipient for n in await _messages(services, "offer_cancelled"))
    assert told == sorted([drivers[1].phone, drivers[2].phone])
    assert (await _metrics(services, booking.id)).final_status == "CANCELLED"

    clock.advance(600)
    handled = await services.sweeper.run_once()
    assert {name: count for name, count in handled.items() if count} == {
        "notification_expiry": 2,  # the two "course annulée" notices, left unsent here, lapse with the offers
    }
    assert {name: handled[name] for name in ("offer_expiry", "search_expiry", "escalation")} == {
        "offer_expiry": 0,
        "search_expiry": 0,
        "escalation": 0,
    }
    assert await _messages(services, "customer_no_driver") == []
    assert (await matching.respond(booking.id, drivers[1].id, "ACCEPT")).action is Action.BOOKING_CANCELLED
    assert (await matching.get_booking(booking.id)).status == "CANCELLED"


async def test_cancel_after_assignment_frees_the_driver(services):
    matching = services.matching
    driver = await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await matching.respond(booking.id, driver.id, "ACCEPT")

    await matching.cancel(booking.id, "no-show")

    freed = await matching.get_driver(driver.id)
    assert (freed.status, freed.current_booking_id) == ("AVAILABLE", None)
    assert [n.recipient for n in await _messages(services, "offer_cancelled")] == [driver.phone]


async def test_deadlines_that_passed_while_down_are_handled_at_the_next_start(services, settings, clock):
    matching = services.matching
    await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await services.db.dispose()  # the server stops

    clock.advance(3600)  # an hour later it starts again
    restarted = build_services(settings, clock)
    try:
        assert await restarted.sweeper.lag_s() == 3600 - 30
        handled = await restarted.sweeper.run_once()
        assert handled["offer_expiry"] == 1 and handled["search_expiry"] == 1
        assert (await restarted.matching.get_booking(booking.id)).status == "TIMEOUT"
        assert await restarted.sweeper.lag_s() == 0
    finally:
        await restarted.db.dispose()
