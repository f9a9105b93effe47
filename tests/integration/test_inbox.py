"""The inbound inbox (issue 13): messages stored once and routed as work on rows, to the handlers the
domains registered; failures retried with backoff then FAILED; matching's typed answers and the
customer's 1/2/3 after a timed-out search; ``GET /v1/inbound``. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from dispatchd.assembly import build_services
from dispatchd.core import events
from dispatchd.core.events import Event
from dispatchd.core.inbound import Inbound
from dispatchd.matching.models import Booking, BookingOffer
from dispatchd.notifications import inbox
from dispatchd.notifications.inbox import ROUTING_POLICY, Received
from dispatchd.notifications.models import InboundMessage, Notification, RoutingStatus
from tests.conftest import admin_headers, new_phone
from tests.factories import create_booking, create_driver, post_api_key

_wamids = iter(range(1, 10**9))


def received(phone: str, text: str | None = None, button_id: str | None = None) -> Received:
    return Received(
        wamid=f"wamid.inbox-{next(_wamids)}",
        from_phone=phone,
        type="interactive" if button_id else "text",
        text=text,
        button_id=button_id,
        context_message_id=None,
        sent_at=None,
        raw={},
    )


@pytest.fixture
def matching_only(services):
    """Only matching's handlers: what matching does not take stays UNROUTED (no dispatcher)."""
    kept = list(services.inbox.handlers)
    services.inbox.handlers[:] = [h for h in kept if h.name.startswith("matching.")]
    yield
    services.inbox.handlers[:] = kept


def left_to_the_dispatcher(stored: InboundMessage) -> bool:
    """Matching did not take it: the next domain's handler did."""
    return (stored.routing_status, stored.handler) == (RoutingStatus.ROUTED, "dispatcher.customer_message")


async def deliver(services, *messages: Received) -> list[str]:
    """Store as the webhook does, then route inline as the webhook does."""
    async with services.db.transaction() as session:
        stored, _ = await inbox.store(session, list(messages))
    await services.inbox.route(services.db, stored)
    return stored


async def row(services, inbound_id: str) -> InboundMessage:
    async with services.db.read() as session:
        return await session.get(InboundMessage, inbound_id)


async def replies_to(services, phone: str) -> list[Notification]:
    async with services.db.read() as session:
        rows = await session.scalars(select(Notification).where(Notification.recipient == phone))
        return list(rows.all())


class Exploding:
    """A handler that writes, then fails: its write must never commit."""

    name = "test.exploding"

    def __init__(self) -> None:
        self.calls = 0

    async def route(self, session, message: Inbound) -> str | None:
        self.calls += 1
        session.add(
            InboundMessage(
                id=f"inb_ghost{self.calls}",
                provider_message_id=f"ghost-{message.id}-{self.calls}",
                from_phone="+1",
                type="text",
                received_at=message.received_at,
                raw={},
            )
        )
        await session.flush()
        events.append(session, "test:ghost", "Ghost", {"calls": self.calls})
        raise RuntimeError("handler bug")


class Poison:
    """Takes the texts "poison": its outcome is fine, but its event cannot be stored, so the whole
    routing transaction fails at commit."""

    name = "test.poison"

    async def route(self, session, message: Inbound) -> str | None:
        if message.text != "poison":
            return None
        events.append(session, "test:poison", "Poison", {"not json": object()})
        return "TAKEN"


async def test_a_message_no_handler_takes_is_unrouted_and_listed(services, client, matching_only):
    [inbound_id] = await deliver(services, received(new_phone(), "Bonjour, je voudrais réserver"))
    stored = await row(services, inbound_id)
    assert (stored.routing_status, stored.handler, stored.outcome, stored.attempts) == (
        RoutingStatus.UNROUTED,
        None,
        None,
        1,
    )
    page = await client.get("/v1/inbound", params={"routing_status": "UNROUTED"}, headers=admin_headers())
    assert page.status_code == 200, page.text
    assert [m["id"] for m in page.json()["messages"]] == [inbound_id]
    assert page.json()["total"] == 1
    one = await client.get(f"/v1/inbound/{inbound_id}", headers=admin_headers())
    assert one.json()["text"] == "Bonjour, je voudrais réserver"
    missing = await client.get("/v1/inbound/inb_nope", headers=admin_headers())
    assert (missing.status_code, missing.json()["code"]) == (404, "INBOUND_MESSAGE_NOT_FOUND")


async def test_drivers_may_not_read_the_inbox(services, client):
    driver = await create_driver(services)
    key = await post_api_key(client, "driver", driver.id)
    answer = await client.get("/v1/inbound", headers={"Authorization": f"Bearer {key['key']}"})
    assert (answer.status_code, answer.json()["code"]) == (403, "FORBIDDEN")


async def test_a_failing_handler_is_retried_with_backoff_then_failed_and_its_writes_never_commit(
    services, clock, client, matching_only
):
    exploding = Exploding()
    services.inbox.handlers.insert(0, exploding)
    [inbound_id] = await deliver(services, received(new_phone(), "ACCEPTER"))
    first = await row(services, inbound_id)
    assert (first.routing_status, first.attempts) == (RoutingStatus.PENDING, 1)
    assert "RuntimeError: handler bug" in first.last_error
    delay = (first.next_attempt_at - clock.now()).total_seconds()
    assert ROUTING_POLICY.base_s * 0.8 <= delay <= ROUTING_POLICY.base_s * 1.2
    assert await services.inbox.route_due(services.db, 10) == 0  # not due yet

    for attempt in range(2, ROUTING_POLICY.max_attempts + 1):
        clock.advance(ROUTING_POLICY.cap_s * 1.5)
        assert await services.inbox.route_due(services.db, 10) == 1
        assert (await row(services, inbound_id)).attempts == attempt
    failed = await row(services, inbound_id)
    assert (failed.routing_status, failed.next_attempt_at) == (RoutingStatus.FAILED, None)
    assert exploding.calls == ROUTING_POLICY.max_attempts
    async with services.db.read() as session:
        ghosts = await session.scalar(
            select(func.count()).select_from(InboundMessage).where(InboundMessage.id.like("inb_ghost%"))
        )
        ghost_events = await session.scalar(
            select(func.count()).select_from(Event).where(Event.topic == "test:ghost")
        )
    assert ghosts == 0 and ghost_events == 0  # neither its rows nor its events

    listed = await client.get("/v1/inbound", params={"routing_status": "FAILED"}, headers=admin_headers())
    assert [m["id"] for m in listed.json()["messages"]] == [inbound_id]
    services.inbox.handlers.remove(exploding)
    retried = await client.post(f"/v1/inbound/{inbound_id}/retry", headers=admin_headers())
    assert retried.status_code == 200 and retried.json()["routing_status"] == "PENDING"
    assert await services.inbox.route_due(services.db, 10) == 1
    assert (await row(services, inbound_id)).routing_status == RoutingStatus.UNROUTED
    again = await client.post(f"/v1/inbound/{inbound_id}/retry", headers=admin_headers())
    assert again.status_code == 200
    assert await services.inbox.route_due(services.db, 10) == 1
    routed_twice = await client.post(f"/v1/inbound/{inbound_id}/retry", headers=admin_headers())
    assert routed_twice.status_code == 200  # UNROUTED may be retried as often as an operator likes


async def test_a_message_whose_routing_cannot_commit_never_blocks_the_ones_behind_it(
    services, clock, matching_only
):
    poison = Poison()
    services.inbox.handlers.insert(0, poison)
    try:
        async with services.db.transaction() as session:
            first, _ = await inbox.store(session, [received(new_phone(), "poison")])
        clock.advance(1)
        async with services.db.transaction() as session:
            second, _ = await inbox.store(session, [received(new_phone(), "bonjour")])
        assert await services.inbox.route_due(services.db, 10) == 2
        stuck, behind = await row(services, first[0]), await row(services, second[0])
        assert (stuck.routing_status, stuck.attempts) == (RoutingStatus.PENDING, 1)
        assert stuck.next_attempt_at > clock.now() and "TypeError" in stuck.last_error
        assert behind.routing_status == RoutingStatus.UNROUTED
        for _ in range(ROUTING_POLICY.max_attempts):
            clock.advance(ROUTING_POLICY.cap_s * 1.5)
            await services.inbox.route_due(services.db, 10)
        assert (await row(services, first[0])).routing_status == RoutingStatus.FAILED
    finally:
        services.inbox.handlers.remove(poison)


async def test_two_instances_route_every_stored_message_exactly_once(services, settings, clock):
    """Many taps stored PENDING (as after a crash), two instances' sweepers routing at once."""
    other = build_services(settings, clock)
    try:
        drivers = [await create_driver(services) for _ in range(12)]
        bookings = [await create_booking(services) for _ in range(3)]
        for booking in bookings:
            await services.matching.start_matching(booking.id)
        taps = [
            received(driver.phone, button_id=f"ACCEPT:{booking.id}")
            for booking in bookings
            for driver in drivers
        ]
        async with services.db.transaction() as session:
            stored, _ = await inbox.store(session, taps)
        counts = await asyncio.gather(
            *(instance.inbox.route_due(instance.db, 7) for instance in (services, other) for _ in range(4))
        )
        while await services.inbox.route_due(services.db, 100):
            pass
        assert sum(counts) <= len(stored)
        async with services.db.read() as session:
            outcomes = (
                await session.execute(
                    select(InboundMessage.outcome, func.count()).group_by(InboundMessage.outcome)
                )
            ).all()
            attempts = set((await session.scalars(select(InboundMessage.attempts))).all())
            assigned = (
                await session.scalars(select(Booking.driver_id).where(Booking.status == "ASSIGNED"))
            ).all()
        by_outcome = dict(outcomes)
        assert attempts == {1}  # no message was routed twice
        assert by_outcome["ASSIGNED"] == len(bookings) == len(assigned)
        assert sum(by_outcome.values()) == len(stored)
        assert len(set(assigned)) == len(assigned)  # a driver wins at most one booking
    finally:
        await other.db.dispose()


@pytest.mark.parametrize("typed", ["ACCEPTER", "oui", " Oui ! ", "Accépter"])
async def test_a_driver_who_types_accepter_with_one_open_offer_wins_it(services, typed):
    driver = await create_driver(services)
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)
    await services.delivery.run_once()  # the offer reaches the driver's phone
    [inbound_id] = await deliver(services, received(driver.phone, typed))
    routed = await row(services, inbound_id)
    assert (routed.handler, routed.outcome) == ("matching.typed_answer", "ASSIGNED")
    assert (await services.matching.get_booking(booking.id)).driver_id == driver.id


async def test_a_driver_who_types_refuser_rejects_the_offer(services):
    driver = await create_driver(services)
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)
    await services.delivery.run_once()
    [inbound_id] = await deliver(services, received(driver.phone, "Refuser."))
    assert (await row(services, inbound_id)).outcome == "REJECTED"
    async with services.db.read() as session:
        offer = await session.scalar(select(BookingOffer).where(BookingOffer.driver_id == driver.id))
    assert offer.response == "REJECTED"


async def test_a_typed_answer_without_one_open_offer_gets_a_clear_reply_and_decides_nothing(services, clock):
    driver = await create_driver(services)
    [none] = await deliver(services, received(driver.phone, "accepter"))
    assert (await row(services, none)).outcome == "NO_OPEN_OFFER"
    first, second = await create_booking(services), await create_booking(services)
    await services.matching.start_matching(first.id)
    await services.matching.start_matching(second.id)
    await services.delivery.run_once()  # the reply above goes first: the offers wait the phone's slot
    clock.advance(services.settings.recipient_interval_s + 1)
    await services.delivery.run_once()  # both offers reach the phone (in one message)
    [several] = await deliver(services, received(driver.phone, "ACCEPTER"))
    assert (await row(services, several)).outcome == "AMBIGUOUS"
    for booking in (first, second):
        assert (await services.matching.get_booking(booking.id)).status == "SEARCHING"
    replies = [n for n in await replies_to(services, driver.phone) if n.category == "driver_reply"]
    assert len(replies) == 2
    assert "Aucune course" in replies[0].body or "Aucune course" in replies[1].body
    assert any("2 courses" in reply.body for reply in replies)


async def test_a_typed_answer_never_accepts_an_offer_the_driver_has_not_received(services):
    driver = await create_driver(services)
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)  # the offer's message is still in the outbox
    [inbound_id] = await deliver(services, received(driver.phone, "oui"))
    assert (await row(services, inbound_id)).outcome == "NO_OPEN_OFFER"
    assert (await services.matching.get_booking(booking.id)).status == "SEARCHING"


async def test_a_bare_oui_just_after_an_offer_expired_is_ambiguous_when_another_is_open(services, clock):
    driver = await create_driver(services)
    first = await create_booking(services)
    await services.matching.start_matching(first.id)
    await services.delivery.run_once()
    clock.advance(services.settings.offer_timeout_s - 5)
    second = await create_booking(services)
    await services.matching.start_matching(second.id)
    clock.advance(6)  # the first offer has expired; the second is open
    await services.sweeper.run_once()
    await services.delivery.run_once()
    [late] = await deliver(services, received(driver.phone, "oui"))
    assert (await row(services, late)).outcome == "AMBIGUOUS"
    assert (await services.matching.get_booking(second.id)).status == "SEARCHING"


async def test_a_reply_quoting_an_offer_answers_that_offer(services):
    driver = await create_driver(services)
    first, second = await create_booking(services), await create_booking(services)
    await services.matching.start_matching(first.id)
    await services.delivery.run_once()
    await services.matching.start_matching(second.id)
    async with services.db.read() as session:
        quoted = await session.scalar(
            select(Notification.provider_message_id).where(
                Notification.subject == f"booking:{first.id}", Notification.recipient == driver.phone
            )
        )
    assert quoted
    reply = received(driver.phone, "ACCEPTER")
    reply = Received(**{**reply.__dict__, "context_message_id": quoted})
    [inbound_id] = await deliver(services, reply)
    assert (await row(services, inbound_id)).outcome == "ASSIGNED"
    assert (await services.matching.get_booking(first.id)).driver_id == driver.id


async def test_a_customer_who_types_oui_is_not_taken_for_a_driver(services):
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)
    [inbound_id] = await deliver(services, received(booking.customer_phone, "oui"))
    assert left_to_the_dispatcher(await row(services, inbound_id))


async def timed_out(services, clock) -> Booking:
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)
    clock.advance(services.settings.search_timeout_s + 1)
    await services.sweeper.run_once()
    timed = await services.matching.get_booking(booking.id)
    assert timed.status == "TIMEOUT"
    return timed


async def test_customer_answer_1_relaunches_the_same_trip_once(services, clock):
    booking = await timed_out(services, clock)
    driver = await create_driver(services)
    [inbound_id] = await deliver(services, received(booking.customer_phone, "1"))
    routed = await row(services, inbound_id)
    assert (routed.handler, routed.outcome) == ("matching.customer_answer", "RELAUNCHED")
    async with services.db.read() as session:
        latest = (
            await session.scalars(
                select(Booking)
                .where(Booking.customer_phone == booking.customer_phone)
                .order_by(Booking.created_at)
            )
        ).all()
        offers = (
            await session.scalars(
                select(BookingOffer.driver_id).where(BookingOffer.booking_id == latest[-1].id)
            )
        ).all()
    assert [b.id for b in latest][0] == booking.id and len(latest) == 2
    relaunched = latest[-1]
    assert relaunched.status == "SEARCHING" and offers == [driver.id]
    for column in ("customer_name", "pickup_address", "pickup_lat", "pickup_lon", "drop_address", "drop_lat"):
        assert getattr(relaunched, column) == getattr(booking, column)
    assert (await services.matching.get_booking(booking.id)).customer_answer == "RELAUNCHED"
    [again] = await deliver(services, received(booking.customer_phone, "1"))
    assert left_to_the_dispatcher(await row(services, again))  # not a second relaunch


@pytest.mark.parametrize(("choice", "outcome"), [("2", "LATER"), (" 3.", "CANCELLED")])
async def test_customer_answers_2_and_3_are_acknowledged_once(services, clock, choice, outcome):
    booking = await timed_out(services, clock)
    [inbound_id] = await deliver(services, received(booking.customer_phone, choice))
    assert (await row(services, inbound_id)).outcome == outcome
    assert (await services.matching.get_booking(booking.id)).customer_answer == outcome
    replies = [
        n for n in await replies_to(services, booking.customer_phone) if n.category == "customer_reply"
    ]
    assert len(replies) == 1
    [twice] = await deliver(services, received(booking.customer_phone, choice))
    assert left_to_the_dispatcher(await row(services, twice))


async def test_a_customer_answer_after_24_hours_is_not_taken(services, clock):
    booking = await timed_out(services, clock)
    clock.advance(timedelta(hours=24, seconds=1).total_seconds())
    [inbound_id] = await deliver(services, received(booking.customer_phone, "1"))
    assert left_to_the_dispatcher(await row(services, inbound_id))


async def test_inbound_filters(services, client):
    phone = new_phone()
    await deliver(services, received(phone, "un"), received(new_phone(), "deux"))
    only = await client.get("/v1/inbound", params={"from_phone": phone}, headers=admin_headers())
    assert [m["text"] for m in only.json()["messages"]] == ["un"]
    bad = await client.get("/v1/inbound", params={"routing_status": "LOST"}, headers=admin_headers())
    assert bad.status_code == 422 and bad.json()["code"] == "VALIDATION_ERROR"
