"""The outbox's first version: rows written with the change, a worker that sends them with a lease."""

from __future__ import annotations

from sqlalchemy import select

from dispatchd.notifications import outbox
from dispatchd.notifications.channels.base import ChannelError, OutboundMessage, SendResult
from dispatchd.notifications.delivery import DeliveryWorker
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message
from tests.factories import create_booking, create_driver, create_drivers


class FlakyChannel:
    """Fails the first ``failures`` sends temporarily, then succeeds; records every call."""

    name = "flaky"

    def __init__(self, failures: int = 0, permanent: bool = False) -> None:
        self.failures = failures
        self.permanent = permanent
        self.calls: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls.append(message)
        if len(self.calls) <= self.failures:
            raise ChannelError("HTTP 503", temporary=not self.permanent)
        return SendResult(provider_message_id=f"wamid.{len(self.calls)}")


async def _rows(services) -> list[Notification]:
    async with services.db.read() as session:
        return list((await session.scalars(select(Notification).order_by(Notification.id))).all())


async def test_matching_messages_are_delivered_by_the_log_channel(services):
    matching = services.matching
    await create_drivers(services, 3)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)

    assert await services.delivery.run_once() == 4  # 3 offers + the customer's "recherche en cours"

    rows = await _rows(services)
    assert {r.status for r in rows} == {"SENT"} and {r.channel for r in rows} == {"log"}
    assert all(r.attempts == 1 and r.sent_at is not None and r.provider_message_id for r in rows)
    assert await services.delivery.run_once() == 0


async def test_a_message_of_a_rolled_back_change_is_never_written(services):
    class Boom(Exception):
        pass

    try:
        async with services.db.transaction() as session:
            await outbox.enqueue(session, [Message(recipient="+221700000001", category="x", body="hello")])
            raise Boom
    except Boom:
        pass
    assert await _rows(services) == []


async def test_temporary_failure_is_retried_after_30_minutes_with_jitter(services, clock):
    channel = FlakyChannel(failures=1)
    worker = DeliveryWorker(services.db, channel)
    async with services.db.transaction() as session:
        await outbox.enqueue(session, [Message(recipient="+221700000001", category="x", body="hello")])

    await worker.run_once()
    [row] = await _rows(services)
    assert (row.status, row.attempts, row.last_error) == ("FAILED", 1, "HTTP 503")
    wait = (row.next_attempt_at - clock.now()).total_seconds()
    assert 1800 * 0.9 <= wait <= 1800 * 1.1  # seed 004: 30 min, ±10 % jitter

    clock.advance(wait - 1)
    assert await worker.run_once() == 0
    clock.advance(1)
    assert await worker.run_once() == 1
    [row] = await _rows(services)
    assert (row.status, row.attempts, row.provider_message_id) == ("SENT", 2, "wamid.2")


async def test_permanent_failure_ends_the_message(services):
    worker = DeliveryWorker(services.db, FlakyChannel(failures=1, permanent=True))
    async with services.db.transaction() as session:
        await outbox.enqueue(session, [Message(recipient="+221700000001", category="x", body="hello")])
    await worker.run_once()
    [row] = await _rows(services)
    assert (row.status, row.next_attempt_at) == ("FAILED_PERMANENT", None)


async def test_a_worker_that_died_mid_send_leaves_rows_to_be_claimed_after_the_lease(services, clock):
    channel = FlakyChannel()
    worker = DeliveryWorker(services.db, channel, lease_s=60)
    async with services.db.transaction() as session:
        await outbox.enqueue(session, [Message(recipient="+221700000001", category="x", body="hello")])
    claimed = await worker._claim()  # the worker claims, then "dies" before sending
    assert len(claimed) == 1

    clock.advance(59)
    assert await worker.run_once() == 0
    clock.advance(1)
    assert await worker.run_once() == 1
    [row] = await _rows(services)
    assert (row.status, row.attempts) == ("SENT", 2)


async def test_expired_message_is_not_sent_late(services, clock):
    channel = FlakyChannel()
    worker = DeliveryWorker(services.db, channel)
    async with services.db.transaction() as session:
        await outbox.enqueue(
            session,
            [
                Message(
                    recipient="+221700000001",
                    category="driver_offer",
                    body="offer",
                    expires_at=clock.advance(0),
                )
            ],
        )
    assert await worker.run_once() == 0  # a claim never takes an expired row
    [row] = await _rows(services)
    assert row.status == "PENDING"
    handled = await services.sweeper.run_once()  # expiry is a deadline, swept in bulk
    [row] = await _rows(services)
    assert handled["notification_expiry"] == 1
    assert (row.status, row.next_attempt_at) == ("EXPIRED", None) and channel.calls == []


async def test_notifications_api_filters_by_booking_and_category(client, services):
    matching = services.matching
    await create_driver(services)
    booking = await create_booking(services)
    await matching.start_matching(booking.id)
    page = (await client.get("/v1/notifications", params={"booking_id": booking.id})).json()
    assert page["total"] == 2
    offers = (await client.get("/v1/notifications", params={"category": "driver_offer"})).json()
    assert offers["total"] == 1 and offers["notifications"][0]["status"] == "PENDING"
    assert offers["notifications"][0]["payload"]["buttons"][0]["title"] == "ACCEPTER"


async def test_a_claim_never_holds_more_rows_than_it_sends_at_once(services, clock):
    """Rows waiting for a send slot while their lease ran out were sent twice by a second worker."""
    channel = FlakyChannel()
    worker = DeliveryWorker(services.db, channel, batch_size=200, concurrency=4, lease_s=60)
    other = DeliveryWorker(services.db, FlakyChannel(), batch_size=200, concurrency=4, lease_s=60)
    async with services.db.transaction() as session:
        await outbox.enqueue(
            session, [Message(recipient=f"+2217000000{n:02d}", category="x", body="hi") for n in range(10)]
        )
    first = await worker._claim()
    second = await other._claim()
    assert len(first) == len(second) == 4
    assert not {c.message.id for c in first} & {c.message.id for c in second}
    while await worker.run_once():
        pass
    assert len(channel.calls) == 10 - len(first) - len(second)  # both claims stay leased, unsent
