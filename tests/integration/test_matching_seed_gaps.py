"""Seed 000 gaps of issue 14: offers reach the drivers in rank order (DISTANCE and RECENT_ACTIVITY), the
customer hears when the search widens (at most once a minute), the logs the seed names, and "no driver
at all" run to its end. SQLite and PostgreSQL, clock moved by hand."""

from __future__ import annotations

from sqlalchemy import select
from structlog.testing import capture_logs

from dispatchd.matching import answers
from dispatchd.matching.broadcast import NO_DRIVER_AVAILABLE
from dispatchd.matching.models import BookingOffer, PriorityMode
from dispatchd.matching.service import Action, MatchingOptions
from dispatchd.notifications.delivery import DeliveryWorker
from dispatchd.notifications.models import Notification
from tests.factories import create_booking, create_driver
from tests.integration.test_outbox_peak import RecordingChannel

PICKUP = (14.6681, -17.4312)


async def _deliver_all(services, channel: RecordingChannel, *, concurrency: int = 2) -> None:
    """Run the worker (small claims, so the order holds across several claims) until the outbox is empty."""
    worker = DeliveryWorker(services.db, channel, concurrency=concurrency)
    while await worker.run_once():
        pass


async def _messages(services, category: str) -> list[Notification]:
    async with services.db.read() as session:
        rows = await session.scalars(
            select(Notification).where(Notification.category == category).order_by(Notification.created_at)
        )
        return list(rows.all())


# ------------------------------------------------------------------------------------ send order


async def test_offers_are_sent_nearest_first_in_distance_mode(services):
    # ~ km east of the pickup, created in an order that is neither nearest nor farthest first
    offsets_km = [3.0, 0.5, 5.0, 1.0, 4.0, 2.0, 0.2]
    drivers = [await create_driver(services, lat=PICKUP[0], lon=PICKUP[1] + km / 107.6) for km in offsets_km]
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id, MatchingOptions(priority_mode=PriorityMode.DISTANCE))

    channel = RecordingChannel()
    await _deliver_all(services, channel)

    by_distance = [d.phone for _, d in sorted(zip(offsets_km, drivers, strict=True), key=lambda p: p[0])]
    offers = [m.recipient for m in channel.sent if m.category == "driver_offer"]
    assert offers == by_distance


async def test_offers_are_sent_most_recently_seen_first_by_default(services, clock):
    drivers = [await create_driver(services) for _ in range(7)]
    heard_from = [drivers[i] for i in (3, 0, 6, 2, 5, 1, 4)]  # heartbeats in this order, 1 s apart
    for driver in heard_from:
        clock.advance(1)
        await services.matching.heartbeat(driver.id)
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)  # RECENT_ACTIVITY, the seed's default

    channel = RecordingChannel()
    await _deliver_all(services, channel)

    offers = [m.recipient for m in channel.sent if m.category == "driver_offer"]
    assert offers == [d.phone for d in reversed(heard_from)]


# ------------------------------------------------------------------------------ search progress


async def test_the_customer_hears_when_the_search_widens_at_most_once_a_minute(services, clock):
    matching = services.matching
    await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)

    await create_driver(services)
    clock.advance(30)  # first offer expired: wave 2 reaches the newcomer
    await services.sweeper.run_once()
    [first] = await _messages(services, "customer_search_progress")
    assert first.recipient == booking.customer_phone
    assert "RECHERCHE ÉLARGIE" in first.body and "1 chauffeurs de plus" in first.body
    assert "2 au total" in first.body
    assert first.expires_at == (await matching.get_booking(booking.id)).search_deadline_at

    await create_driver(services)
    clock.advance(30)  # wave 3, 30 s after the last message: no second message yet
    await services.sweeper.run_once()
    assert (await matching.get_booking(booking.id)).wave == 3
    assert len(await _messages(services, "customer_search_progress")) == 1

    await create_driver(services)
    clock.advance(30)  # wave 4, 60 s after the first message
    await services.sweeper.run_once()
    progress = await _messages(services, "customer_search_progress")
    assert (await matching.get_booking(booking.id)).wave == 4
    assert len(progress) == 2 and "4 au total" in progress[1].body


async def test_a_wave_that_finds_nobody_says_nothing_and_a_match_cancels_what_is_queued(services, clock):
    matching = services.matching
    await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    clock.advance(30)  # wave 2 finds nobody new
    await services.sweeper.run_once()
    assert await _messages(services, "customer_search_progress") == []

    newcomer = await create_driver(services)
    clock.advance(10)  # wave_retry_s later: the newcomer is offered, the customer told
    await services.sweeper.run_once()
    [queued] = await _messages(services, "customer_search_progress")
    assert queued.status == "PENDING"
    assert (await matching.respond(booking.id, newcomer.id, "ACCEPT")).action is Action.ASSIGNED
    [moot] = await _messages(services, "customer_search_progress")
    assert (moot.status, moot.cancel_reason) == ("CANCELLED", "driver found")


# ------------------------------------------------------------------------------------------ logs


async def test_each_driver_timeout_is_logged_with_the_booking_driver_and_count(services, clock):
    drivers = [await create_driver(services) for _ in range(2)]
    booking = await create_booking(services, customer_phone="+221771234567")
    await services.matching.start_matching(booking.id)
    clock.advance(30)

    with capture_logs() as logs:
        await services.sweeper.run_once()

    timeouts = [line for line in logs if line["event"] == "driver timeout"]
    assert {(t["booking_id"], t["driver_id"]) for t in timeouts} == {(booking.id, d.id) for d in drivers}
    assert all(t["log_level"] == "warning" and t["response_time_ms"] == 30_000 for t in timeouts)
    assert [t["total_timeouts"] for t in timeouts] == [2, 2]
    assert "+221771234567" not in repr(logs)


async def test_a_lost_race_is_an_error_naming_both_drivers(services):
    matching = services.matching
    winner, loser = await create_driver(services), await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    seen = await matching.get_booking(booking.id)  # what the loser's transaction read: SEARCHING, v2
    assert (await matching.respond(booking.id, winner.id, "ACCEPT")).action is Action.ASSIGNED

    with capture_logs() as logs:
        async with services.db.transaction() as session:  # the loser's UPDATE runs after the winner's
            offer = await session.scalar(
                select(BookingOffer).where(
                    BookingOffer.booking_id == booking.id, BookingOffer.driver_id == loser.id
                )
            )
            result = await answers._accept(session, matching.config, offer, seen.status, seen.version)

    assert (result.success, result.action) == (False, Action.ALREADY_TAKEN)
    [race] = [line for line in logs if line["event"] == "race condition detected"]
    assert race["log_level"] == "error"
    assert (race["booking_id"], race["driver_id"], race["winner_driver_id"]) == (
        booking.id,
        loser.id,
        winner.id,
    )


# ------------------------------------------------------------------------- seed §2.1 integration


async def test_no_drivers_at_all_times_out_after_5_minutes_tells_the_customer_and_alerts(services, clock):
    """Seed 000 "Tests d'intégration" no drivers available: the search runs its waves to the end."""
    matching = services.matching
    booking = await create_booking(services, customer_name="Moussa Diop")
    started = await matching.start_matching(booking.id)
    assert (started.drivers_notified, started.errors) == (0, [NO_DRIVER_AVAILABLE])

    for _ in range(29):  # a wave every 10 s finds nobody, up to 4 min 50 s
        clock.advance(10)
        handled = await services.sweeper.run_once()
        assert handled["search_expiry"] == 0
    assert (await matching.get_booking(booking.id)).status == "SEARCHING"
    clock.advance(10)  # 5 minutes
    assert (await services.sweeper.run_once())["search_expiry"] == 1

    final = await matching.get_booking(booking.id)
    assert final.status == "TIMEOUT" and await matching.list_offers(booking.id) == []
    channel = RecordingChannel()
    await _deliver_all(services, channel)
    told = [m for m in channel.sent if m.recipient == booking.customer_phone]
    assert [m.category for m in told] == ["customer_no_driver"]  # "recherche en cours" was made moot
    assert "AUCUN CHAUFFEUR DISPONIBLE" in told[0].body and "*1* - Réessayer maintenant" in told[0].body
    [alert] = [m for m in channel.sent if m.category == "admin_alert"]
    assert alert.recipient == "+33600000000"
    assert "Moussa Diop" in alert.body and booking.id in alert.body and "après 5 minutes" in alert.body
    assert await _messages(services, "customer_search_progress") == []
