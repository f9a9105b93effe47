"""Issue 7: the outbox at a real peak, one test per cause (SQLite and PostgreSQL, moved clock).

- a head of paced rows never blocks anyone (pacing slots are left out of the claim);
- customers and admins go before driver offers (priority);
- expiry is a deadline swept in bulk, whatever pacing says;
- a change cancels the messages it makes moot, in its own transaction;
- a paced driver's open offers go out as one message, only the open ones, nearest first;
- backlog health and the latency alert.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select, update

from dispatchd.core.db import Database
from dispatchd.matching import messages
from dispatchd.notifications import admin, outbox
from dispatchd.notifications.alerts import AlertMonitor, Thresholds, combine_alerts
from dispatchd.notifications.channels.base import OutboundMessage, SendResult
from dispatchd.notifications.channels.whatsapp_cloud import build_payload
from dispatchd.notifications.delivery import DeliveryWorker
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message
from tests.factories import create_booking, create_bookings, create_driver, create_drivers

COALESCERS = {"driver_offer": messages.combine_offers, "offer_taken": messages.combine_taken}


class RecordingChannel:
    name = "recording"

    def __init__(self) -> None:
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        return SendResult(provider_message_id=f"wamid.{len(self.sent)}")

    def to(self, phone: str) -> list[OutboundMessage]:
        return [message for message in self.sent if message.recipient == phone]


def _worker(services, channel, *, concurrency: int = 8, interval_s: float = 6.0) -> DeliveryWorker:
    return DeliveryWorker(
        services.db, channel, concurrency=concurrency, recipient_interval_s=interval_s, coalescers=COALESCERS
    )


async def _enqueue(services, *items: Message) -> None:
    async with services.db.transaction() as session:
        await outbox.enqueue(session, list(items))


async def _rows(services, **where) -> list[Notification]:
    query = select(Notification).order_by(Notification.created_at, Notification.id)
    for name, value in where.items():
        query = query.where(getattr(Notification, name) == value)
    async with services.db.read() as session:
        return list((await session.scalars(query)).all())


def _offer(phone: str, n: int, *, expires_at=None, distance_km: float | None = None) -> Message:
    return Message(
        recipient=phone,
        category="driver_offer",
        body=f"offer {n}",
        subject=f"booking:bkg_{n:032x}",
        payload={
            "booking_id": f"bkg_{n:032x}",
            "trip": f"A{n} → B{n}",
            "distance_km": distance_km,
            "buttons": [
                {"id": f"ACCEPT:bkg_{n:032x}", "title": "ACCEPTER"},
                {"id": f"REJECT:bkg_{n:032x}", "title": "REFUSER"},
            ],
        },
        expires_at=expires_at,
    )


# ------------------------------------------------------------------------------- head-of-line, priority


async def test_a_head_of_paced_rows_does_not_block_another_phone(services, clock):
    channel = RecordingChannel()
    worker = DeliveryWorker(services.db, channel, concurrency=2, recipient_interval_s=6)  # no coalescing
    # 200 older offers to two drivers, then one message to a third phone, all of the same priority
    await _enqueue(services, _offer("+221770000000", 0), _offer("+221770000001", 1))
    clock.advance(0.5)
    await _enqueue(services, *(_offer(f"+22177000000{n % 2}", n) for n in range(2, 200)))
    clock.advance(0.5)
    await _enqueue(services, _offer("+221770000009", 999))

    assert await worker.run_once() == 2  # one per driver: their slots are now taken
    assert {m.recipient for m in channel.sent} == {"+221770000000", "+221770000001"}
    assert await worker.run_once() == 1  # the claim looks past the 198 paced rows
    assert channel.sent[-1].recipient == "+221770000009"
    assert await worker.run_once() == 0  # the paced ones wait; nothing fails
    clock.advance(6)
    assert await worker.run_once() == 2


async def test_customers_and_admins_go_before_a_broadcast(services, clock):
    channel = RecordingChannel()
    worker = _worker(services, channel, concurrency=3)
    await _enqueue(services, *(_offer(f"+2217700001{n:02d}", n) for n in range(60)))
    clock.advance(1)
    await _enqueue(
        services,
        Message(recipient="+221780000001", category="customer_driver_found", body="found"),
        Message(recipient="+33600000000", category="admin_alert", body="alert"),
    )
    await worker.run_once()
    assert [m.category for m in channel.sent] == ["admin_alert", "customer_driver_found", "driver_offer"]
    [found] = await _rows(services, category="customer_driver_found")
    assert (found.priority, found.status) == (1, "SENT")


async def test_two_workers_never_send_to_one_phone_within_its_interval(services, clock):
    """Real concurrency: two workers with their own connections claim rows of the same 10 phones."""
    channel = RecordingChannel()
    other_db = Database(services.settings.database_url, clock=clock)
    try:
        workers = [
            DeliveryWorker(db, channel, concurrency=4, recipient_interval_s=6)
            for db in (services.db, other_db)
        ]
        await _enqueue(services, *(_offer(f"+2217700002{n % 10:02d}", n) for n in range(100)))
        for _ in range(5):
            await asyncio.gather(*(worker.run_once() for worker in workers for _ in range(3)))
        phones = [m.recipient for m in channel.sent]
        assert len(phones) == 10 and len(set(phones)) == 10  # each phone once in this 6 s slot
    finally:
        await other_db.dispose()


# --------------------------------------------------------------------------------------------- expiry


async def test_an_expired_paced_row_becomes_expired_at_the_next_sweep(services, clock):
    channel = RecordingChannel()
    worker = DeliveryWorker(services.db, channel, concurrency=4, recipient_interval_s=60)
    phone = "+221770000300"
    await _enqueue(services, _offer(phone, 1))
    clock.advance(1)
    await _enqueue(services, _offer(phone, 2, expires_at=clock.now() + timedelta(seconds=10)))
    assert await worker.run_once() == 1  # offer 1 takes the phone's slot for 60 s
    clock.advance(11)
    assert await worker.run_once() == 0
    handled = await services.sweeper.run_once()
    assert handled["notification_expiry"] == 1
    rows = {row.body: row for row in await _rows(services)}
    assert (rows["offer 2"].status, rows["offer 2"].next_attempt_at) == ("EXPIRED", None)
    assert [m.body for m in channel.sent] == ["offer 1"]
    health = await admin.health(services.db)
    assert health["backlog"] == 0


# ----------------------------------------------------------------------------------------- moot messages


async def _deliver_to(services, phones: set[str]) -> None:
    """Mark these phones' queued driver offers as handed to the provider (as a delivery would)."""
    async with services.db.transaction() as session:
        await session.execute(
            update(Notification)
            .where(Notification.recipient.in_(phones), Notification.category == "driver_offer")
            .values(status="SENT", sent_at=clock_now(session), next_attempt_at=None)
        )


def clock_now(session):
    return session.info["now"]


async def test_an_assignment_cancels_unsent_offers_and_only_tells_drivers_who_saw_it(services):
    matching = services.matching
    drivers = await create_drivers(services, 4)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await _deliver_to(services, {drivers[1].phone})  # only driver 1's offer left the outbox

    result = await matching.respond(booking.id, drivers[0].id, "ACCEPT")

    assert result.success
    offers = {row.recipient: row for row in await _rows(services, category="driver_offer")}
    assert offers[drivers[1].phone].status == "SENT"
    for driver in (drivers[0], drivers[2], drivers[3]):
        assert (offers[driver.phone].status, offers[driver.phone].cancel_reason) == (
            "CANCELLED",
            "booking assigned",
        )
    taken = await _rows(services, category="offer_taken")
    assert [row.recipient for row in taken] == [drivers[1].phone]  # "course prise" only where it was seen
    [started] = await _rows(services, category="customer_search_started")
    assert (started.status, started.cancel_reason) == ("CANCELLED", "driver found")
    [found] = await _rows(services, category="customer_driver_found")
    assert found.status == "PENDING"


async def test_the_winner_s_other_unsent_offers_are_cancelled(services):
    matching = services.matching
    winner, other = await create_drivers(services, 2)
    first, second = await create_bookings(services, 2)
    await matching.start_matching(first.id)
    await matching.start_matching(second.id)

    await matching.respond(first.id, winner.id, "ACCEPT")

    rows = await _rows(services, category="driver_offer", recipient=winner.phone)
    assert {(row.subject, row.status, row.cancel_reason) for row in rows} == {
        (f"booking:{first.id}", "CANCELLED", "booking assigned"),
        (f"booking:{second.id}", "CANCELLED", "driver busy"),
    }
    [still] = await _rows(
        services, category="driver_offer", subject=f"booking:{second.id}", recipient=other.phone
    )
    assert still.status == "PENDING"


async def test_a_cancel_or_timeout_tells_only_drivers_who_saw_the_offer(services, clock):
    matching = services.matching
    drivers = await create_drivers(services, 3)
    cancelled, timed_out = await create_bookings(services, 2)
    await matching.start_matching(cancelled.id)
    await _deliver_to(services, {drivers[0].phone})
    await matching.start_matching(timed_out.id)

    await matching.cancel(cancelled.id, "customer changed plans")
    told = await _rows(services, category="offer_cancelled")
    assert [row.recipient for row in told] == [drivers[0].phone]

    clock.advance(301)
    await services.sweeper.run_once()
    rows = await _rows(services, category="driver_offer", subject=f"booking:{timed_out.id}")
    assert {(row.status, row.cancel_reason) for row in rows} == {("CANCELLED", "search timed out")}
    assert await _rows(services, category="customer_no_driver")  # the customer is told


async def test_a_rejection_cancels_the_driver_s_unsent_offer(services):
    matching = services.matching
    driver, other = await create_drivers(services, 2)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await matching.respond(booking.id, driver.id, "REJECT")  # answered in the app before WhatsApp sent it
    [row] = await _rows(services, category="driver_offer", recipient=driver.phone)
    assert (row.status, row.cancel_reason) == ("CANCELLED", "driver answered")
    [kept] = await _rows(services, category="driver_offer", recipient=other.phone)
    assert kept.status == "PENDING"


# -------------------------------------------------------------------------------------------- coalescing


async def test_coalescing_keeps_only_open_offers_nearest_first(services, clock):
    matching = services.matching
    channel = RecordingChannel()
    worker = _worker(services, channel)
    near = await create_driver(services, lat=14.668, lon=-17.431)
    rival = await create_driver(services, lat=14.70, lon=-17.40)
    bookings = await create_bookings(services, 4)
    await matching.start_matching(bookings[0].id)
    await worker.run_once()  # both drivers get offer 0 alone; their slots are taken for 6 s
    assert [m.payload["buttons"][0]["id"] for m in channel.to(near.phone)] == [f"ACCEPT:{bookings[0].id}"]

    for booking in bookings[1:]:
        await matching.start_matching(booking.id)
    await matching.respond(bookings[1].id, rival.id, "ACCEPT")  # offer 1 is moot before it is sent
    clock.advance(6)
    await worker.run_once()

    [first, combined] = channel.to(near.phone)
    assert combined.body.startswith("🚕 *2 COURSES DISPONIBLES*")
    buttons = [button["id"] for button in combined.payload["buttons"]]
    assert sorted(buttons) == sorted(f"ACCEPT:{b.id}" for b in bookings[2:])
    rows = await _rows(services, category="driver_offer", recipient=near.phone)
    by_subject = {row.subject: row for row in rows}
    carried = [by_subject[f"booking:{b.id}"] for b in bookings[2:]]
    assert {row.status for row in carried} == {"SENT"}
    assert {row.provider_message_id for row in carried} == {f"wamid.{channel.sent.index(combined) + 1}"}
    assert sorted(row.carried_by is None for row in carried) == [False, True]  # one carrier, one carried
    assert by_subject[f"booking:{bookings[1].id}"].status == "CANCELLED"
    # the rival won booking 1: no message about booking 1 reaches the near driver, who never saw it
    assert not await _rows(services, category="offer_taken", recipient=near.phone)


def _outbound(n: int, distance_km: float | None) -> OutboundMessage:
    message = _offer("+221770000400", n, distance_km=distance_km)
    return OutboundMessage(f"ntf_{n}", message.recipient, message.category, message.body, message.payload)


def test_many_open_offers_become_one_list_of_the_ten_nearest():
    offers = [_outbound(n, float(20 - n)) for n in range(12)] + [_outbound(99, None)]
    combined = messages.combine_offers(offers)
    assert len(combined.ids) == 10
    assert combined.ids[0] == "ntf_11" and "ntf_99" not in combined.ids  # nearest first, unknown last
    rows = combined.payload["list"]["rows"]
    assert [row["id"] for row in rows][:2] == [f"ACCEPT:bkg_{11:032x}", f"ACCEPT:bkg_{10:032x}"]
    assert rows[0]["title"] == "1. 9.0 km"
    body = build_payload(
        OutboundMessage("ntf_11", "+221770000400", "driver_offer", combined.body, combined.payload)
    )
    assert body["type"] == "interactive" and body["interactive"]["type"] == "list"
    sent_rows = body["interactive"]["action"]["sections"][0]["rows"]
    assert len(sent_rows) == 10 and all(len(row["title"]) <= 24 for row in sent_rows)


def test_three_offers_fit_in_reply_buttons():
    combined = messages.combine_offers([_outbound(n, float(n)) for n in range(3)])
    assert [b["title"] for b in combined.payload["buttons"]] == ["ACCEPTER 1", "ACCEPTER 2", "ACCEPTER 3"]
    assert "list" not in combined.payload


# ---------------------------------------------------------------------------------- health and alerts


async def test_health_shows_the_oldest_due_by_category_and_what_pacing_holds(services, clock):
    channel = RecordingChannel()
    worker = DeliveryWorker(services.db, channel, concurrency=1, recipient_interval_s=6)
    await _enqueue(services, _offer("+221770000500", 1), _offer("+221770000500", 2))
    clock.advance(2)
    await _enqueue(services, Message(recipient="+221780000002", category="customer_driver_found", body="x"))
    await worker.run_once()  # the customer first (priority)
    await worker.run_once()  # then offer 1; offer 2 is held by the phone's slot
    health = await admin.health(services.db)
    assert health["held_by_pacing"] == 1
    assert health["due_by_category"] == {"driver_offer": {"due": 1, "oldest_waiting_s": 2.0}}


async def test_a_customer_message_waiting_over_the_latency_bound_alerts_the_admins(services, clock):
    monitor = AlertMonitor(
        services.db, [], admin_phones=("+33600000000",), thresholds=Thresholds(latency_alert_s=60)
    )
    await _enqueue(services, Message(recipient="+221780000003", category="customer_driver_found", body="x"))
    await _enqueue(services, _offer("+221770000600", 1))  # offers are not what this alert is about
    clock.advance(59)
    assert [a.rule for a in await monitor.run_once()] == []
    clock.advance(2)
    [alert] = await monitor.run_once()
    assert alert.rule == "SLOW_DELIVERY" and "1 message(s)" in alert.text
    [sent] = await _rows(services, category="admin_alert")
    assert sent.priority == 0


async def test_a_message_that_expires_between_claim_and_send_is_not_sent(services, clock):
    channel = RecordingChannel()
    worker = DeliveryWorker(services.db, channel, recipient_interval_s=6)
    await _enqueue(services, _offer("+221770000700", 1, expires_at=clock.now() + timedelta(seconds=1)))
    [claimed] = await worker._claim()  # a busy process: the send comes 2 s after the claim
    clock.advance(2)
    lane = worker.lanes[0]
    await worker._record(lane, [await worker._send(lane, claimed)], probing=False)
    [row] = await _rows(services)
    assert (row.status, row.sent_at) == ("EXPIRED", None) and channel.sent == []


class FailingChannel(RecordingChannel):
    """Refuses every send with a temporary error (HTTP 503)."""

    async def send(self, message: OutboundMessage) -> SendResult:
        from dispatchd.notifications.channels.base import ChannelError

        self.sent.append(message)
        raise ChannelError("HTTP 503", temporary=True)


async def test_an_offer_made_moot_in_flight_is_cancelled_when_its_send_fails(services, clock):
    matching = services.matching
    channel = FailingChannel()
    worker = _worker(services, channel)
    seen, winner = await create_drivers(services, 2)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    claimed = await worker._claim()  # the offers are in flight…
    await matching.respond(booking.id, winner.id, "ACCEPT")  # …when the booking is taken

    [in_flight] = await _rows(services, category="driver_offer", recipient=seen.phone)
    assert (in_flight.status, in_flight.cancel_reason) == ("SENDING", "booking assigned")
    assert not await _rows(services, category="offer_taken")  # not SENT yet: nobody is told
    lane = worker.lanes[0]
    await worker._record(lane, [await worker._send(lane, item) for item in claimed], probing=False)

    [row] = await _rows(services, category="driver_offer", recipient=seen.phone)
    assert (row.status, row.next_attempt_at) == ("CANCELLED", None)  # not retried: it is moot
    [started] = await _rows(services, category="customer_search_started")
    assert (started.status, started.cancel_reason) == ("CANCELLED", "driver found")
    clock.advance(6)  # the customer's phone was called: its next slot
    assert await worker.run_once() == 1  # only the customer's "chauffeur trouvé" is left to send
    assert [m.category for m in channel.sent[len(claimed) :]] == ["customer_driver_found"]


async def test_a_slow_send_holds_the_phone_until_the_provider_answers(services, clock):
    channel = RecordingChannel()
    worker = DeliveryWorker(services.db, channel, concurrency=4, recipient_interval_s=6, lease_s=60)
    other = DeliveryWorker(services.db, channel, concurrency=4, recipient_interval_s=6, lease_s=60)
    phone = "+221770000800"
    await _enqueue(services, _offer(phone, 1))
    clock.advance(0.1)
    await _enqueue(services, _offer(phone, 2))
    [claimed] = await worker._claim()
    clock.advance(6.5)  # the provider has not answered yet
    assert await other.run_once() == 0  # the phone is still held: Meta would refuse a second message
    lane = worker.lanes[0]
    await worker._record(lane, [await worker._send(lane, claimed)], probing=False)
    clock.advance(5.9)
    assert await other.run_once() == 0  # 6 s from the answer, not from the claim
    clock.advance(0.1)
    assert await other.run_once() == 1


async def test_a_burst_of_admin_alerts_reaches_the_admin_as_one_digest(services, clock):
    channel = RecordingChannel()
    worker = DeliveryWorker(
        services.db, channel, recipient_interval_s=6, coalescers={"admin_alert": combine_alerts}
    )
    await _enqueue(services, Message(recipient="+33600000000", category="admin_alert", body="first"))
    await worker.run_once()
    await _enqueue(
        services,
        *(
            Message(recipient="+33600000000", category="admin_alert", body=f"timeout {n} " * 60)
            for n in range(12)
        ),
    )
    clock.advance(6)
    await worker.run_once()
    [_, digest] = channel.sent
    assert digest.body.startswith("🚨 *10 ALERTES ADMIN*") and len(digest.body) <= 4096
    clock.advance(6)
    await worker.run_once()
    assert channel.sent[-1].body.startswith("🚨 *2 ALERTES ADMIN*")
    assert {row.status for row in await _rows(services, category="admin_alert")} == {"SENT"}


async def test_an_operator_can_still_send_a_message_cancelled_as_moot(services):
    channel = RecordingChannel()
    worker = _worker(services, channel)
    matching = services.matching
    driver, winner = await create_drivers(services, 2)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    await matching.respond(booking.id, winner.id, "ACCEPT")
    [moot] = await _rows(services, category="driver_offer", recipient=driver.phone)
    assert moot.status == "CANCELLED"

    await admin.retry_one(services.db, moot.id)
    await worker.run_once()
    [row] = await _rows(services, category="driver_offer", recipient=driver.phone)
    assert (row.status, row.cancel_reason) == ("SENT", None)
