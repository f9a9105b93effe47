"""The realtime streams (issue 9, seed 002) on SQLite and PostgreSQL, against a real uvicorn server:
resume without loss, concurrent writers, who may read what, stream tokens, revoked keys, slow
consumers, agents' presence carried by their WebSocket, drivers' answers over WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from httpx_sse import aconnect_sse
from sqlalchemy import select

from dispatchd.app import create_app
from dispatchd.assembly import Services
from dispatchd.core import events
from dispatchd.core.events import Event
from dispatchd.dispatcher.models import Agent, Conversation, Presence
from dispatchd.realtime import metrics
from dispatchd.realtime.hub import CloseCode, StreamClosed
from tests.conftest import admin_headers, booking_data, driver_data, make_settings, new_phone, serve_app
from tests.integration.test_dispatcher_scenarios import write
from tests.prom import sample

pytestmark = pytest.mark.asyncio


@pytest.fixture
def settings(db_url: str):
    return make_settings(
        db_url, auth_cache_s=0.5, stream_fallback_read_s=0.2, agent_disconnect_grace_s=20, stream_ping_s=0.3
    )


@pytest.fixture
async def server(services: Services, settings, clock) -> AsyncIterator[str]:
    """A real uvicorn server sharing ``services`` (so the test can drive its sweeper and hub): its
    ``host:port``. The hub is stopped first, which ends open streams so that uvicorn can stop."""
    app = create_app(settings, clock=clock, run_migrations=False, background=False, services=services)
    async with serve_app(app, before_stop=services.realtime.hub.stop) as url:
        yield url.removeprefix("http://")


@pytest.fixture
async def http(server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{server}", headers=admin_headers(), timeout=10) as client:
        yield client


async def publish(http: httpx.AsyncClient, topic: str, count: int, start: int = 0) -> list[int]:
    answer = await http.post(
        "/v1/events",
        json={"events": [{"topic": topic, "type": "Tick", "data": {"n": start + n}} for n in range(count)]},
    )
    assert answer.status_code == 201, answer.text
    return answer.json()["ids"]


async def read_sse(
    http: httpx.AsyncClient, params: dict[str, Any], *, until: int, headers: dict | None = None
) -> list[dict]:
    """Open ``GET /v1/stream`` and collect events until one with id ``until`` (or a close frame)."""
    received: list[dict] = []
    async with aconnect_sse(http, "GET", "/v1/stream", params=params, headers=headers or {}) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for sse in source.aiter_sse():
            if not sse.data:
                continue  # the retry: hint
            if sse.event == "close":
                received.append({"close": json.loads(sse.data)})
                return received
            event = json.loads(sse.data)
            assert int(sse.id) == event["id"] and sse.event == event["type"]
            received.append(event)
            if event["id"] >= until:
                return received
    return received


async def key_for(http: httpx.AsyncClient, role: str, subject: str | None = None) -> dict[str, str]:
    body: dict[str, Any] = {"role": role}
    if subject:
        body["subject"] = subject
    created = await http.post("/v1/api-keys", json=body)
    assert created.status_code == 201, created.text
    return created.json()


# ------------------------------------------------------------------------------------------ resume


async def test_a_client_that_drops_mid_stream_resumes_with_every_event_once_in_order(http):
    """500 events written while the client reads; it drops after ~150 and resumes with Last-Event-ID."""
    first_id = (await publish(http, "test:warmup", 1))[0]
    written: list[int] = []

    async def writer() -> None:
        for batch in range(50):
            written.extend(await publish(http, f"test:{batch % 3}", 10, batch * 10))
            await asyncio.sleep(0.002)

    received: list[dict] = []
    writing = asyncio.create_task(writer())
    async with aconnect_sse(
        http, "GET", "/v1/stream", params={"topic": "test:*", "after": first_id}
    ) as source:
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            received.append(json.loads(sse.data))
            if len(received) >= 150:
                break  # the connection drops here, with writes still going on
    await writing
    last = received[-1]["id"]
    received += await read_sse(
        http, {"topic": "test:*"}, until=written[-1], headers={"Last-Event-ID": str(last)}
    )
    ids = [event["id"] for event in received]
    assert ids == written  # every event once, in order, and nothing of other topics
    assert [event["data"]["n"] for event in received] == list(range(500))


async def test_an_idle_stream_gets_a_comment_ping_from_the_hub(http):
    async with http.stream("GET", "/v1/stream", params={"topic": "test:idle"}) as answer:
        lines = answer.aiter_lines()
        assert await anext(lines) == "retry: 2000"
        seen = []
        async with asyncio.timeout(3):
            while ": ping" not in seen:
                seen.append(await anext(lines))
    assert all(line in ("", ": ping") for line in seen)  # nothing but keep-alives


async def test_after_resumes_like_last_event_id_and_the_stream_starts_with_a_retry_hint(http):
    ids = await publish(http, "test:a", 5)
    async with http.stream("GET", "/v1/stream", params={"topic": "test:a", "after": ids[1]}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = answer.aiter_lines()
        assert await anext(lines) == "retry: 2000"
    replayed = await read_sse(http, {"topic": "test:a", "after": ids[1]}, until=ids[-1])
    assert [event["id"] for event in replayed] == ids[2:]


async def test_concurrent_writers_that_commit_out_of_order_reach_a_subscriber_in_id_order(services):
    """Writers hold their transactions open for random times and some roll back; the subscriber gets
    exactly the committed events, in increasing id order (DESIGN.md "Outbox ordering")."""
    hub = services.realtime.hub
    subscription = hub.subscription(_admin(), ["test:*"], "sse")
    received: list[int] = []
    rng = random.Random(9)

    class Abort(Exception):
        pass

    async def writer(number: int) -> None:
        for sequence in range(20):
            with contextlib.suppress(Abort):
                async with services.db.transaction() as session:
                    events.append(session, f"test:{number}", "Tick", {"sequence": sequence})
                    await asyncio.sleep(rng.random() * 0.01)
                    if rng.random() < 0.2:
                        raise Abort

    async def consume() -> None:
        async for event in subscription.events(None):
            received.append(event.id)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.05)  # subscribed
    await asyncio.gather(*(writer(n) for n in range(6)))
    async with services.db.read() as session:
        committed = list((await session.scalars(select(Event.id).order_by(Event.id))).all())
    for _ in range(100):
        if len(received) >= len(committed):
            break
        await asyncio.sleep(0.05)
    consumer.cancel()
    assert received == committed
    assert 0 < len(committed) < 120  # some rolled back


# ------------------------------------------------------------------------------------------ who reads


async def test_a_driver_reads_only_its_own_topic(http, services):
    mine = await services.matching.create_driver(driver_data())
    other = await services.matching.create_driver(driver_data())
    key = (await key_for(http, "driver", f"driver:{mine.id}"))["key"]
    as_driver = {"Authorization": f"Bearer {key}"}
    for topic in (f"driver:{other.id}", "booking:*", "*"):
        refused = await http.get("/v1/stream", params={"topic": topic}, headers=as_driver)
        assert refused.status_code == 403, topic
        assert refused.json()["code"] == "FORBIDDEN"
        token = await http.post("/v1/stream-tokens", json={"topics": [topic]}, headers=as_driver)
        assert token.status_code == 403
    # its own topic, and nothing else, even with no topic asked for
    ids = await publish(http, f"driver:{other.id}", 1) + await publish(http, f"driver:{mine.id}", 1)
    got = await read_sse(http, {"after": ids[0] - 1}, until=ids[1], headers=as_driver)
    assert [event["id"] for event in got] == [ids[1]]


async def test_a_stream_token_lets_a_browser_connect_for_60_s_to_its_topics_only(http, services, clock):
    driver = await services.matching.create_driver(driver_data())
    key = (await key_for(http, "driver", f"driver:{driver.id}"))["key"]
    issued = await http.post("/v1/stream-tokens", json={}, headers={"Authorization": f"Bearer {key}"})
    assert issued.status_code == 201
    token = issued.json()
    assert token["topics"] == [f"driver:{driver.id}"]
    ids = await publish(http, f"driver:{driver.id}", 2)
    async with httpx.AsyncClient(base_url=http.base_url) as browser:  # no Authorization header
        got = await read_sse(browser, {"token": token["token"], "after": ids[0]}, until=ids[1])
        assert [event["id"] for event in got] == [ids[1]]
        other = await browser.get("/v1/stream", params={"token": token["token"], "topic": "booking:x"})
        assert other.status_code == 403
        forged = await browser.get("/v1/stream", params={"token": token["token"][:-2] + "xx"})
        assert (forged.status_code, forged.json()["code"]) == (401, "STREAM_TOKEN_INVALID")
        refused_before = metrics.TOKENS_REFUSED.labels("expired")._value.get()
        clock.advance(61)
        expired = await browser.get("/v1/stream", params={"token": token["token"]})
        assert (expired.status_code, expired.json()["code"]) == (401, "STREAM_TOKEN_EXPIRED")
        assert metrics.TOKENS_REFUSED.labels("expired")._value.get() == refused_before + 1
        bare = await browser.get("/v1/stream")
        assert bare.status_code == 401


async def streams_open(services: Services, key_id: str, count: int) -> None:
    """Wait (at most 5 s) until ``key_id`` has ``count`` streams open in the server."""
    for _ in range(250):
        if services.realtime.hub.open_streams(key_id) == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key_id} has {services.realtime.hub.open_streams(key_id)} streams, not {count}")


async def test_a_revoked_keys_open_stream_is_closed_within_the_auth_cache_time(http, services):
    created = await key_for(http, "integration")
    as_key = {"Authorization": f"Bearer {created['key']}"}
    token = (await http.post("/v1/stream-tokens", json={"topics": ["test:r"]}, headers=as_key)).json()
    reader = asyncio.create_task(read_sse(http, {"topic": "test:r"}, until=10**9, headers=as_key))
    async with httpx.AsyncClient(base_url=http.base_url) as browser:
        by_token = asyncio.create_task(read_sse(browser, {"token": token["token"]}, until=10**9))
        await streams_open(services, created["id"], 2)
        assert (await http.delete(f"/v1/api-keys/{created['id']}")).status_code == 200
        closed = await asyncio.wait_for(asyncio.gather(reader, by_token), 5)  # auth cache: 0.5 s
        assert [got[-1]["close"]["code"] for got in closed] == [CloseCode.KEY_REVOKED] * 2
        again = await browser.get("/v1/stream", params={"token": token["token"]})
        assert (again.status_code, again.json()["code"]) == (401, "KEY_REVOKED")


async def test_a_revoked_keys_websocket_is_closed_even_without_a_subscription(http, server):
    created = await key_for(http, "integration")
    token = (
        await http.post("/v1/stream-tokens", json={}, headers={"Authorization": f"Bearer {created['key']}"})
    ).json()["token"]
    socket = await ws_connect(server, token)
    assert (await http.delete(f"/v1/api-keys/{created['id']}")).status_code == 200
    closing = json.loads(await asyncio.wait_for(socket.recv(), 5))  # auth cache: 0.5 s
    assert (closing["op"], closing["code"]) == ("close", CloseCode.KEY_REVOKED)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(socket.recv(), 5)
    assert closed.value.rcvd.code == 1008


async def test_streams_per_key_are_capped(http, services):
    services.realtime.max_per_key = 2
    created = await key_for(http, "integration")
    as_key = {"Authorization": f"Bearer {created['key']}"}
    open_streams = [asyncio.create_task(read_sse(http, {"topic": "test:cap"}, until=10**9, headers=as_key))]
    open_streams.append(
        asyncio.create_task(read_sse(http, {"topic": "test:cap"}, until=10**9, headers=as_key))
    )
    await streams_open(services, created["id"], 2)
    third = await http.get("/v1/stream", params={"topic": "test:cap"}, headers=as_key)
    assert (third.status_code, third.json()["code"]) == (429, "TOO_MANY_STREAMS")
    for task in open_streams:
        task.cancel()


# ------------------------------------------------------------------------------------------ slow consumer


async def test_a_slow_consumer_is_closed_with_a_reason_and_loses_nothing_when_it_resumes(services):
    hub = services.realtime.hub
    hub.queue_max = 10
    await hub.start()
    subscription = hub.subscription(_admin(), ["test:slow"], "sse")
    stream = subscription.events(None)
    first = asyncio.create_task(anext(stream))
    await asyncio.sleep(0)  # registered, waiting for the first event
    before = hub.position
    async with services.db.transaction() as session:
        for n in range(30):
            events.append(session, "test:slow", "Tick", {"n": n})
    await hub.read_new()  # 30 events for a queue of 10, nobody reading
    got: list[int] = []
    with pytest.raises(StreamClosed) as closed:
        got.append((await first).id)
        while True:
            got.append((await anext(stream)).id)
    assert closed.value.code == CloseCode.SLOW_CONSUMER
    assert len(got) < 30
    resumed = hub.subscription(_admin(), ["test:slow"], "sse")
    rest = resumed.events(got[-1] if got else before)
    while len(got) < 30:
        got.append((await anext(rest)).id)
    async with services.db.read() as session:
        assert got == [e.id for e in await events.read(session, topics=["test:slow"])]


# ------------------------------------------------------------------------------------------ WebSocket


async def ws_connect(server: str, token: str) -> websockets.ClientConnection:
    socket = await websockets.connect(f"ws://{server}/v1/ws")
    await socket.send(json.dumps({"op": "auth", "token": token}))
    welcome = json.loads(await socket.recv())
    assert welcome["op"] == "welcome", welcome
    return socket


async def test_websocket_subscribe_resume_ping_and_refusals(http, server):
    token = (await http.post("/v1/stream-tokens", json={"topics": []})).json()["token"]
    ids = await publish(http, "test:w", 3)
    async with await ws_connect(server, token) as socket:
        await socket.send(json.dumps({"op": "subscribe", "topics": ["test:w"], "after": ids[0], "ref": 1}))
        assert json.loads(await socket.recv()) == {"op": "subscribed", "topics": ["test:w"], "ref": 1}
        assert [json.loads(await socket.recv())["id"] for _ in range(2)] == ids[1:]
        live = (await publish(http, "test:w", 1))[0]
        event = json.loads(await socket.recv())
        assert (event["id"], event["topic"], event["type"]) == (live, "test:w", "Tick")
        await socket.send(json.dumps({"op": "ping", "ref": "p"}))
        assert json.loads(await socket.recv()) == {"op": "pong", "ref": "p"}
        await socket.send("not json")
        assert json.loads(await socket.recv())["code"] == "VALIDATION_ERROR"
        await socket.send(json.dumps({"op": "unsubscribe", "topics": ["test:w"]}))
        assert json.loads(await socket.recv())["op"] == "unsubscribed"
        await publish(http, "test:w", 1)
        await socket.send(json.dumps({"op": "ping"}))
        assert json.loads(await socket.recv())["op"] == "pong"  # nothing of test:w came first
    async with websockets.connect(f"ws://{server}/v1/ws") as socket:
        await socket.send(json.dumps({"op": "auth", "token": token + "x"}))
        assert json.loads(await socket.recv())["code"] == "STREAM_TOKEN_INVALID"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await socket.recv()
        assert closed.value.rcvd.code == 1008


async def test_a_driver_answers_an_offer_over_websocket_and_the_first_accept_wins(http, server, services):
    booking = await services.matching.create_booking(booking_data())
    drivers = [await services.matching.create_driver(driver_data()) for _ in range(2)]
    await services.matching.start_matching(booking.id)
    sockets = []
    for driver in drivers:
        key = (await key_for(http, "driver", f"driver:{driver.id}"))["key"]
        token = (
            await http.post("/v1/stream-tokens", json={}, headers={"Authorization": f"Bearer {key}"})
        ).json()["token"]
        sockets.append(await ws_connect(server, token))
    for socket in sockets:
        await socket.send(
            json.dumps({"op": "respond", "booking_id": booking.id, "type": "ACCEPT", "ref": "a"})
        )
    answers = [json.loads(await socket.recv()) for socket in sockets]
    assert sorted(answer["action"] for answer in answers) == ["ALREADY_TAKEN", "ASSIGNED"]
    await sockets[0].send(json.dumps({"op": "subscribe", "topics": ["booking:*"]}))
    assert json.loads(await sockets[0].recv())["code"] == "FORBIDDEN"
    for socket in sockets:
        await socket.close()
    assert (await services.matching.get_booking(booking.id)).status == "ASSIGNED"


async def test_an_agents_websocket_carries_its_presence_and_a_close_hands_its_conversations_on(
    http, server, services, clock
):
    agents = [
        (await services.dispatcher.create_agent({"name": name, "phone": new_phone(), "capacity": 5})).id
        for name in ("Awa", "Bintou")
    ]
    tokens = []
    for agent_id in agents:
        key = (await key_for(http, "agent", f"agent:{agent_id}"))["key"]
        answer = await http.post("/v1/stream-tokens", json={}, headers={"Authorization": f"Bearer {key}"})
        tokens.append(answer.json()["token"])
    first = await ws_connect(server, tokens[0])
    assert (await _agent(services, agents[0])).presence == Presence.ONLINE.value
    await first.send(json.dumps({"op": "subscribe", "topics": []}))
    assert json.loads(await first.recv())["topics"] == [f"agent:{agents[0]}"]
    phone = new_phone()
    await write(services, phone, "Bonjour")
    assigned = json.loads(await first.recv())
    assert (assigned["type"], assigned["data"]["agent_id"]) == ("ConversationAssigned", agents[0])
    message = json.loads(await first.recv())
    assert (message["type"], message["data"]["body"]) == ("MessageReceived", "Bonjour")

    second = await ws_connect(server, tokens[1])  # the other agent is ONLINE while connected
    await first.close()  # a real close
    for _ in range(100):
        if not services.realtime.presence.streams.get(agents[0]):
            break
        await asyncio.sleep(0.02)
    clock.advance(10)
    await services.sweeper.run_once()
    assert (await _agent(services, agents[0])).presence == Presence.ONLINE.value  # within the grace
    await services.realtime.presence.beat()  # the open socket keeps Bintou present
    clock.advance(15)
    await services.sweeper.run_once()
    assert (await _agent(services, agents[0])).presence == Presence.OFFLINE.value
    async with services.db.read() as session:
        moved = await session.scalar(select(Conversation).where(Conversation.customer_phone == phone))
    assert moved.agent_id == agents[1]
    assert (await _agent(services, agents[1])).presence == Presence.ONLINE.value
    await second.close()


async def test_metrics_move_with_streams(http):
    pushed = metrics.EVENTS_PUSHED.labels("sse")
    before = pushed._value.get()
    scraped = (await http.get("/metrics")).text
    ids = await publish(http, "test:m", 3)
    await read_sse(http, {"topic": "test:m", "after": ids[0] - 1}, until=ids[-1])
    assert pushed._value.get() == before + 3
    text = (await http.get("/metrics")).text
    assert sample(text, "dispatchd_stream_resumes_total", transport="sse") == (
        sample(scraped, "dispatchd_stream_resumes_total", transport="sse") + 1
    )
    assert sample(text, "dispatchd_stream_events_pushed_total", transport="sse") == (
        sample(scraped, "dispatchd_stream_events_pushed_total", transport="sse") + 3
    )


def _admin():
    from dispatchd.core.auth import Principal, Role

    return Principal(key_id="key_test", role=Role.ADMIN)


async def _agent(services: Services, agent_id: str) -> Agent:
    async with services.db.read() as session:
        return await session.get(Agent, agent_id)


async def test_admins_follow_alerts_and_delivery_changes_on_their_topics(http, services):
    from dispatchd.notifications import outbox
    from dispatchd.notifications.delivery import DeliveryWorker
    from dispatchd.notifications.outbox import Message
    from dispatchd.notifications.policy import ADMIN_ALERT
    from tests.integration.test_outbox_delivery import FlakyChannel

    start = (await publish(http, "test:mark", 1))[0]
    async with services.db.transaction() as session:
        await outbox.enqueue(
            session,
            [Message(recipient=phone, category=ADMIN_ALERT, body="🚨 no driver") for phone in ("+1", "+2")]
            + [Message(recipient="+221700000001", category="x", body="hello")],
        )
    await DeliveryWorker(services.db, FlakyChannel(failures=3, permanent=True)).run_once()
    logged = (await http.get("/v1/events", params={"after": start})).json()["events"]
    got = await read_sse(http, {"topic": ["alerts", "notifications"], "after": start}, until=logged[-1]["id"])
    assert [(event["topic"], event["type"]) for event in got] == [
        ("alerts", "AlertRaised"),
        ("notifications", "NotificationFailedPermanently"),
        ("notifications", "NotificationFailedPermanently"),
        ("notifications", "NotificationFailedPermanently"),
    ]
    assert len(got[0]["data"]["notification_ids"]) == 2  # one alert, however many admins are told


async def test_only_staff_read_the_alerts_and_notifications_topics(http, services):
    driver = await services.matching.create_driver(driver_data())
    key = (await key_for(http, "driver", f"driver:{driver.id}"))["key"]
    for topic in ("alerts", "notifications"):
        refused = await http.get(
            "/v1/stream", params={"topic": topic}, headers={"Authorization": f"Bearer {key}"}
        )
        assert refused.status_code == 403


async def test_redis_pub_sub_wakes_another_instances_hub(db_url, redis_url, clock):
    """Two instances on one database with DISPATCHD_STREAM_REDIS_URL: a commit on one wakes the other's
    hub at once, although its fallback read is 5 s away (on SQLite, Redis is the only wake-up)."""
    from dispatchd.assembly import build_services

    settings = make_settings(db_url, stream_redis_url=redis_url, stream_fallback_read_s=5)
    writer, reader = build_services(settings, clock), build_services(settings, clock)
    try:
        hub = reader.realtime.hub
        subscription = hub.subscription(_admin(), ["test:redis"], "ws")
        stream = subscription.events(None)
        first = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.3)  # subscribed, Redis subscription open, first fallback read done
        loop = asyncio.get_running_loop()
        for number in range(3):
            started = loop.time()
            async with writer.db.transaction() as session:
                events.append(session, "test:redis", "Tick", {"n": number})
            event = await asyncio.wait_for(first if number == 0 else anext(stream), 2)
            assert event.record.data == {"n": number}
            assert loop.time() - started < 1.0
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_technician_follows_their_resources_reservations_through_a_token_minted_by_the_back_end(
    http, services
):
    """Seed 002's technician (intervenant): the business's back-end (an integration key) mints a token
    bound to the technician's resource; their browser streams its reservations and waiting list live."""
    from tests.factories import post_resource

    resource_id = await post_resource(http, capacity=1)
    other_id = await post_resource(http, capacity=1)
    backend = {"Authorization": f"Bearer {(await key_for(http, 'integration'))['key']}"}
    token = await http.post(
        "/v1/stream-tokens", json={"topics": [f"resource:{resource_id}"]}, headers=backend
    )
    start = (await publish(http, "test:mark", 1))[0]
    for target in (other_id, resource_id):
        reserved = await http.post(
            "/v1/reservations", json={"resource_id": target, "client_id": "c1", "quantity": 1}
        )
        assert reserved.status_code == 201, reserved.text
    reservation_id = reserved.json()["id"]
    joined = await http.post(
        "/v1/waiting-list/join", json={"resource_id": resource_id, "client_id": "c2", "quantity": 1}
    )
    assert joined.status_code == 201, joined.text
    assert (await http.post(f"/v1/reservations/{reservation_id}/cancel")).status_code == 200
    logged = (
        await http.get("/v1/events", params={"after": start, "topic": f"resource:{resource_id}"})
    ).json()
    async with httpx.AsyncClient(base_url=http.base_url) as browser:
        got = await read_sse(
            browser, {"token": token.json()["token"], "after": start}, until=logged["events"][-1]["id"]
        )
    types = [event["type"] for event in got]
    assert types[:3] == ["ReservationConfirmed", "WaitingListJoined", "ReservationCancelled"]
    assert "WaitingListOffered" in types
    assert {event["topic"] for event in got} == {f"resource:{resource_id}"}


async def test_every_tab_of_one_user_receives_every_event(http, server, services):
    agent = await services.dispatcher.create_agent({"name": "Awa", "phone": new_phone()})
    created = await key_for(http, "agent", f"agent:{agent.id}")
    as_agent = {"Authorization": f"Bearer {created['key']}"}
    start = (await publish(http, "test:mark", 1))[0]
    seen: list[list[int]] = [[], [], []]

    async def tab(into: list[int]) -> None:
        async with aconnect_sse(
            http, "GET", "/v1/stream", params={"after": start}, headers=as_agent
        ) as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    into.append(json.loads(sse.data)["id"])

    tabs = [asyncio.create_task(tab(into)) for into in seen]
    token = (await http.post("/v1/stream-tokens", json={}, headers=as_agent)).json()["token"]
    async with await ws_connect(server, token) as socket:
        await socket.send(json.dumps({"op": "subscribe", "topics": [], "after": start}))
        assert json.loads(await socket.recv())["op"] == "subscribed"
        await streams_open(services, created["id"], 4)
        for _ in range(500):  # the streams' presence commits AgentConnected: let it land before ours
            if (await services.dispatcher.get_agent(agent.id)).presence == "ONLINE":
                break
            await asyncio.sleep(0.02)
        ids = await publish(http, f"agent:{agent.id}", 2)
        on_socket = []
        while len(on_socket) < 2 or on_socket[-1] != ids[-1]:
            on_socket.append(json.loads(await socket.recv())["id"])
    for _ in range(500):  # up to 10 s: a loaded machine delays the SSE tabs, not what they receive
        if all(into and into[-1] == ids[-1] for into in seen):
            break
        await asyncio.sleep(0.02)
    for task in tabs:
        task.cancel()
    assert on_socket[-2:] == ids  # after the agent's own AgentConnected
    assert all(into == on_socket for into in seen), (seen, on_socket)
