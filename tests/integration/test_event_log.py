"""The event log never lets a reader skip an event, even when transactions commit out of order.

DESIGN.md "Outbox ordering": on PostgreSQL tx A can take id 41, tx B id 42 and commit first. Writers
here append, then dawdle before committing, in random order, while a reader tails ``id > cursor``.
"""

from __future__ import annotations

import asyncio
import random

from sqlalchemy import select

from dispatchd.core import events
from dispatchd.core.events import Event


async def test_concurrent_writers_and_a_tailing_reader_see_every_event_in_order(services):
    db = services.db
    writers, per_writer = 8, 25
    done = asyncio.Event()
    rng = random.Random(41)

    async def writer(number: int) -> None:
        for sequence in range(per_writer):
            async with db.transaction() as session:
                events.append(session, f"test:{number}", "Tick", {"writer": number, "sequence": sequence})
                await asyncio.sleep(rng.random() * 0.004)  # hold the transaction open a little, at random

    seen: list[int] = []

    async def reader() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            async with db.read() as session:
                page = await events.read(session, after_id=cursor, limit=50)
            seen.extend(e.id for e in page)
            if page:
                cursor = page[-1].id
            elif finished:
                return
            await asyncio.sleep(0.001)

    tail = asyncio.create_task(reader())
    await asyncio.gather(*(writer(n) for n in range(writers)))
    done.set()
    await tail

    async with db.read() as session:
        stored = list((await session.scalars(select(Event.id).order_by(Event.id))).all())
    assert len(stored) == writers * per_writer
    assert seen == stored  # nothing skipped, nothing twice, in id order


async def test_events_of_a_rolled_back_transaction_are_never_written(services):
    class Boom(Exception):
        pass

    try:
        async with services.db.transaction() as session:
            events.append(session, "test:x", "Lost", {})
            raise Boom
    except Boom:
        pass
    async with services.db.read() as session:
        assert await events.read(session) == []


async def test_topic_filter_and_paging(services):
    async with services.db.transaction() as session:
        for number in range(5):
            events.append(session, f"test:{number % 2}", "Tick", {"n": number})
    async with services.db.read() as session:
        odd = await events.read(session, topics=["test:1"])
        first_two = await events.read(session, limit=2)
        rest = await events.read(session, after_id=first_two[-1].id)
    assert [e.data["n"] for e in odd] == [1, 3]
    assert [e.data["n"] for e in first_two + rest] == [0, 1, 2, 3, 4]


async def test_events_api_pages_with_next_after(client):
    for number in range(3):
        await client.post(
            "/v1/drivers",
            json={
                "name": f"D{number}",
                "phone": f"+22170000100{number}",
                "vehicle_type": "Moto",
                "vehicle_plate": "X",
            },
        )
    first = (await client.get("/v1/events", params={"limit": 2})).json()
    second = (await client.get("/v1/events", params={"after": first["next_after"], "limit": 2})).json()
    empty = (await client.get("/v1/events", params={"after": second["next_after"]})).json()
    assert [e["id"] for e in first["events"]] == [1, 2] and first["next_after"] == 2
    assert [e["id"] for e in second["events"]] == [3] and second["next_after"] == 3
    assert empty == {"events": [], "next_after": 3}
    assert first["events"][0]["type"] == "DriverUpdated"


async def test_staff_read_topic_patterns_and_a_driver_key_only_its_own_topic(services, client):
    from tests.factories import post_driver_with_key

    async with services.db.transaction() as session:
        events.append(session, "booking:bkg_a", "T", {})
        events.append(session, "booking:bkg_b", "T", {})
        events.append(session, "resource:res_a", "T", {})
    page = await client.get("/v1/events", params={"topic": "booking:*"})
    assert [e["topic"] for e in page.json()["events"]] == ["booking:bkg_a", "booking:bkg_b"]
    both = await client.get("/v1/events", params=[("topic", "booking:*"), ("topic", "resource:res_a")])
    assert len(both.json()["events"]) == 3

    driver_id, key = await post_driver_with_key(client)
    mine = {"Authorization": f"Bearer {key}"}
    own = await client.get("/v1/events", headers=mine)
    assert {e["topic"] for e in own.json()["events"]} == {f"driver:{driver_id}"}
    for forbidden in ("booking:*", "booking:bkg_a", "driver:drv_other"):
        answer = await client.get("/v1/events", params={"topic": forbidden}, headers=mine)
        assert (answer.status_code, answer.json()["code"]) == (403, "FORBIDDEN"), forbidden
