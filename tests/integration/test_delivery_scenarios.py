"""Issue 3 "Proof": the delivery worker against a fake WhatsApp Cloud API (httpx.MockTransport), with the
real channel, breaker, policy and alerts, on a moved clock; SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import timedelta

import httpx
from sqlalchemy import select

from dispatchd.notifications import outbox
from dispatchd.notifications.alerts import AlertMonitor
from dispatchd.notifications.breaker import CircuitBreaker, CircuitState
from dispatchd.notifications.channels.whatsapp_cloud import WhatsAppCloudChannel
from dispatchd.notifications.delivery import DeliveryWorker, Lane
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message

TOKEN = "EAAG-secret-token"


class FakeMeta:
    """Answers each call with the next planned response (the last one repeats); records every request."""

    def __init__(self, *plan: Callable[[httpx.Request], httpx.Response]) -> None:
        self.plan = list(plan)
        self.requests: list[dict] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        answer = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
        return answer(request)


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"messaging_product": "whatsapp", "messages": [{"id": "wamid.OK"}]})


def meta_error(status: int, code: int, headers: dict | None = None):
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, json={"error": {"code": code, "message": f"error {code}"}}, headers=headers
        )

    return answer


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _worker(services, fake: FakeMeta, **kwargs) -> DeliveryWorker:
    channel = WhatsAppCloudChannel(
        "https://graph.example/v21.0",
        "1234",
        TOKEN,
        http=httpx.AsyncClient(transport=httpx.MockTransport(fake.handler)),
    )
    lane = Lane(
        channel, Notification.recipient.like("+%"), CircuitBreaker(channel.name, services.db.clock), rate=None
    )
    return DeliveryWorker(services.db, lanes=[lane], rng=random.Random(1), **kwargs)


async def _enqueue(services, *messages: Message) -> None:
    async with services.db.transaction() as session:
        await outbox.enqueue(session, list(messages))


async def _rows(services) -> list[Notification]:
    async with services.db.read() as session:
        return list(
            (
                await session.scalars(select(Notification).order_by(Notification.created_at, Notification.id))
            ).all()
        )


def _message(n: int = 1, category: str = "customer_search_started", **extra) -> Message:
    return Message(recipient=f"+2217700000{n:02d}", category=category, body=f"message {n}", **extra)


async def test_503s_then_success(services, clock):
    fake = FakeMeta(meta_error(503, 131000), meta_error(503, 131000), ok)
    worker = _worker(services, fake)
    await _enqueue(services, _message())
    for _ in range(3):
        await worker.run_once()
        clock.advance(86_400)
    [row] = await _rows(services)
    assert (row.status, row.attempts, row.provider_message_id) == ("SENT", 3, "wamid.OK")
    assert len(fake.requests) == 3 and fake.requests[0]["biz_opaque_callback_data"] == row.id


async def test_429_retry_after_is_honoured(services, clock):
    fake = FakeMeta(meta_error(429, 130429, {"Retry-After": "120"}), ok)
    worker = _worker(services, fake)
    await _enqueue(
        services, _message(category="driver_offer", expires_at=clock.now() + timedelta(minutes=10))
    )
    await worker.run_once()
    [row] = await _rows(services)
    assert row.status == "FAILED" and row.error_code == "META_130429"
    assert (row.next_attempt_at - clock.now()).total_seconds() >= 120  # not the offer's 2 s schedule
    clock.advance(119)
    assert await worker.run_once() == 0
    clock.advance(1)
    await worker.run_once()
    assert (await _rows(services))[0].status == "SENT"


async def test_401_opens_the_circuit_alerts_and_burns_no_attempt(services, clock):
    fake = FakeMeta(meta_error(401, 190))
    worker = _worker(services, fake)
    monitor = AlertMonitor(services.db, worker.breakers, admin_phones=("+33600000000",))
    await _enqueue(services, *(_message(n) for n in range(5)))

    await worker.run_once()
    calls = len(fake.requests)
    assert worker.breakers[0].state is CircuitState.OPEN
    for _ in range(3):  # open: nothing is sent
        clock.advance(5)
        assert await worker.run_once() == 0
    assert len(fake.requests) == calls
    rows = await _rows(services)
    assert {r.status for r in rows} == {"FAILED"} and {r.attempts for r in rows} == {0}
    assert {r.error_code for r in rows if r.error_code} == {"META_190"}
    assert TOKEN not in " ".join(r.last_error or "" for r in rows)

    fired = {a.rule for a in await monitor.run_once()}
    assert {"CIRCUIT_OPEN:whatsapp_cloud", "ACCOUNT_PROBLEM"} <= fired
    alerts = [r for r in await _rows(services) if r.category == "admin_alert"]
    assert alerts and all(a.recipient == "+33600000000" for a in alerts) and "ALERTE ADMIN" in alerts[0].body
    assert await monitor.run_once() == []  # 1 h cooldown, kept in the database

    fake.plan = [ok]  # the operator fixed the token: the next probe closes the circuit
    clock.advance(60)
    while await worker.run_once():
        pass
    assert worker.breakers[0].state is CircuitState.CLOSED
    sent = [r for r in await _rows(services) if r.category != "admin_alert"]
    assert {r.status for r in sent} == {"SENT"} and {r.attempts for r in sent} == {1}


async def test_window_closed_falls_back_to_the_approved_template(services, clock):
    fake = FakeMeta(meta_error(400, 131047), ok)
    worker = _worker(
        services, fake, templates={"customer_search_started": {"name": "suivi_course", "language": "fr"}}
    )
    await _enqueue(services, _message())
    await worker.run_once()
    await worker.run_once()
    [row] = await _rows(services)
    assert row.status == "SENT" and row.payload["template"]["name"] == "suivi_course"
    assert fake.requests[0]["type"] == "text" and fake.requests[1]["type"] == "template"
    assert fake.requests[1]["template"]["language"] == {"code": "fr"}


async def test_window_closed_without_template_is_permanent(services, clock):
    worker = _worker(services, FakeMeta(meta_error(400, 131047)))
    await _enqueue(services, _message())
    await worker.run_once()
    [row] = await _rows(services)
    assert (row.status, row.error_kind) == ("FAILED_PERMANENT", "WINDOW_CLOSED")


async def test_an_offer_past_its_ttl_is_expired_never_sent_late(services, clock):
    fake = FakeMeta(meta_error(503, 131000))
    worker = _worker(services, fake)
    await _enqueue(
        services, _message(1, category="driver_offer", expires_at=clock.now() + timedelta(seconds=30))
    )
    await _enqueue(
        services, _message(2, category="driver_offer", expires_at=clock.now() + timedelta(seconds=30))
    )
    for _ in range(6):  # fast retries of a time-critical message: seconds, not minutes
        await worker.run_once()
        clock.advance(3)
    fake.plan = [ok]
    clock.advance(30)
    assert await worker.run_once() == 0  # a claim never takes an expired row
    assert (await services.sweeper.run_once())["notification_expiry"] == 2
    rows = await _rows(services)
    assert {r.status for r in rows} == {"EXPIRED"}
    assert all(r.sent_at is None for r in rows)


async def test_pacing_makes_later_messages_to_one_phone_wait(services, clock):
    fake = FakeMeta(ok)
    worker = _worker(services, fake, recipient_interval_s=6)
    await _enqueue(services, _message(1), _message(1), _message(2))
    assert await worker.run_once() == 2  # one per phone
    clock.advance(5)
    assert await worker.run_once() == 0  # the second to +221770000001 waits, it does not fail
    clock.advance(1)
    assert await worker.run_once() == 1
    assert {r.status for r in await _rows(services)} == {"SENT"}


async def test_a_three_day_outage_loses_nothing_and_burns_no_attempts(services, clock):
    fake = FakeMeta(unreachable)
    worker = _worker(services, fake, concurrency=20)
    await _enqueue(services, *(_message(n) for n in range(30)))
    await worker.run_once()  # the first batch (20 sends) fails and opens the circuit
    before = {r.id: r.attempts for r in await _rows(services)}
    assert worker.breakers[0].state is CircuitState.OPEN

    for _ in range(3 * 24 * 4):  # three days, in 15-minute steps, the provider unplugged
        clock.advance(900)
        await worker.run_once()
    calls_during_outage = len(fake.requests)
    assert {r.id: r.attempts for r in await _rows(services)} == before  # probes give their attempt back

    fake.plan = [ok]  # plugged back in
    for _ in range(100):
        clock.advance(900)
        if not await worker.run_once() and all(r.status == "SENT" for r in await _rows(services)):
            break
    rows = await _rows(services)
    assert {r.status for r in rows} == {"SENT"} and len(rows) == 30
    assert all(r.attempts == before[r.id] + 1 for r in rows)
    assert calls_during_outage < 3 * 24 * 6 + 20  # probing, not hammering: at most a probe per cooldown


async def test_pacing_counts_from_the_provider_s_answer_not_from_the_claim(services, clock):
    fake = FakeMeta(ok)
    worker = _worker(services, fake, recipient_interval_s=6)
    await _enqueue(services, _message(1), _message(1))
    [claimed] = await worker._claim()  # the provider takes 2 s to answer this one
    clock.advance(2)
    lane = worker.lanes[0]
    await worker._record(lane, [await worker._send(lane, claimed)], probing=False)
    clock.advance(5)  # 7 s after the claim, only 5 s after Meta accepted the first message
    assert await worker.run_once() == 0
    clock.advance(1)
    assert await worker.run_once() == 1


async def test_meta_s_pair_rate_limit_waits_for_the_phone_s_next_slot_and_burns_no_attempt(services, clock):
    fake = FakeMeta(meta_error(400, 131056), ok)
    worker = _worker(services, fake, recipient_interval_s=6)
    await _enqueue(services, _message(1))
    await worker.run_once()
    [row] = await _rows(services)
    assert (row.status, row.attempts, row.error_code) == ("FAILED", 0, "META_131056")
    assert (row.next_attempt_at - clock.now()).total_seconds() == 6  # seconds, not the 30 min backoff
    assert worker.breakers[0].state is CircuitState.CLOSED
    clock.advance(6)
    assert await worker.run_once() == 1
    [row] = await _rows(services)
    assert (row.status, row.attempts) == ("SENT", 1)
