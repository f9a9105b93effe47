"""Seed 003: capacity booked atomically, never overbooked; waiting list; admin; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io

import aiohttp
import httpx
from sqlalchemy import select

from dispatchd.notifications.models import Notification
from dispatchd.reservations.common import REFUSALS
from dispatchd.reservations.service import ResourceFull
from tests.conftest import admin_headers
from tests.factories import create_resource, post_api_key, post_resource
from tests.prom import sample


async def _reserve(http, resource_id: str, quantity: int = 1, client: str = "c1", **headers):
    return await http.post(
        "/v1/reservations",
        json={"resource_id": resource_id, "client_id": client, "quantity": quantity},
        headers=headers,
    )


async def _hundred_buyers_for_the_last_place(base_urls: list[str]) -> list[int]:
    """100 simultaneous POSTs (aiohttp: real sockets, no client-side queueing) spread over ``base_urls``."""
    async with aiohttp.ClientSession(headers=admin_headers()) as http:
        async with http.post(
            f"{base_urls[0]}/v1/resources", json={"type": "seat", "name": "last seat", "capacity": 1}
        ) as created:
            resource_id = (await created.json())["id"]
        barrier = asyncio.Barrier(100)

        async def buy(n: int) -> tuple[int, str]:
            await barrier.wait()
            async with http.post(
                f"{base_urls[n % len(base_urls)]}/v1/reservations",
                json={"resource_id": resource_id, "client_id": f"buyer-{n}", "quantity": 1},
            ) as answer:
                return answer.status, (await answer.json()).get("code", "CONFIRMED")

        results = await asyncio.gather(*(buy(n) for n in range(100)))
        async with http.get(f"{base_urls[-1]}/v1/resources/{resource_id}") as read:
            resource = await read.json()
    assert sorted(set(results)) == [(201, "CONFIRMED"), (409, "RESOURCE_FULL")]
    assert [status for status, _ in results].count(201) == 1
    assert (resource["reserved"], resource["available"]) == (1, 0)
    return [status for status, _ in results]


async def test_hundred_simultaneous_buyers_for_one_place_through_a_live_server(live_server):
    statuses = await _hundred_buyers_for_the_last_place([live_server])
    assert statuses.count(409) == 99


async def test_every_refusal_has_its_code_and_changes_nothing(client):
    resource_id = await post_resource(client, 2)
    assert (await _reserve(client, resource_id, 2)).status_code == 201
    full = await _reserve(client, resource_id)
    assert (full.status_code, full.json()["code"]) == (409, "RESOURCE_FULL")
    assert full.headers["content-type"].startswith("application/problem+json")
    assert (await client.post(f"/v1/resources/{resource_id}/close")).json()["state"] == "CLOSED"
    closed = await _reserve(client, resource_id)
    assert closed.json()["code"] == "RESOURCE_CLOSED"
    assert (await _reserve(client, "res_missing")).json()["code"] == "RESOURCE_NOT_FOUND"
    assert (await _reserve(client, resource_id, 0)).json()["code"] == "VALIDATION_ERROR"
    again = await client.post(f"/v1/resources/{resource_id}/close")
    assert (again.status_code, again.json()["code"]) == (409, "INVALID_STATE")
    shrink = await client.patch(f"/v1/resources/{resource_id}", json={"capacity": 1})
    assert (shrink.status_code, shrink.json()["code"]) == (409, "INVALID_STATE")
    resource = (await client.get(f"/v1/resources/{resource_id}")).json()
    assert (resource["capacity"], resource["reserved"], resource["state"]) == (2, 2, "CLOSED")
    timeline = (await client.get(f"/v1/resources/{resource_id}/timeline")).json()["events"]
    rejected = [e["data"]["code"] for e in timeline if e["type"] == "ReservationRejected"]
    assert rejected == ["RESOURCE_FULL", "RESOURCE_CLOSED"]


async def test_cancel_frees_the_places_once(client):
    resource_id = await post_resource(client, 1)
    reservation = (await _reserve(client, resource_id)).json()
    cancelled = await client.post(f"/v1/reservations/{reservation['id']}/cancel")
    assert cancelled.json()["status"] == "CANCELLED" and cancelled.json()["cancelled_at"]
    twice = await client.post(f"/v1/reservations/{reservation['id']}/cancel")
    assert twice.json()["code"] == "INVALID_STATE"
    assert (await client.get(f"/v1/resources/{resource_id}")).json()["reserved"] == 0
    assert (await _reserve(client, resource_id)).status_code == 201


async def test_timeline_of_ten_sequential_reservations(client, clock):
    """Seed 003 "Scénario timeline": ordered server timestamps, timeline rebuilt from the event log."""
    resource_id = await post_resource(client, 10)
    made = []
    for n in range(10):
        clock.advance(1)
        made.append((await _reserve(client, resource_id, client=f"client-{n}")).json())
    stamps = [r["created_at"] for r in made]
    assert stamps == sorted(stamps) and len(set(stamps)) == 10
    timeline = (await client.get(f"/v1/resources/{resource_id}/timeline")).json()["events"]
    confirmed = [e for e in timeline if e["type"] == "ReservationConfirmed"]
    assert [e["data"]["reservation_id"] for e in confirmed] == [r["id"] for r in made]
    assert [e["data"]["reserved"] for e in confirmed] == list(range(1, 11))
    assert [e["data"]["version"] for e in confirmed] == sorted(e["data"]["version"] for e in confirmed)
    assert [e["data"]["at"] for e in confirmed] == [e for e in sorted(e["data"]["at"] for e in confirmed)]


async def test_idempotency_key_returns_the_first_answer(client):
    resource_id = await post_resource(client, 5)
    first = await _reserve(client, resource_id, **{"Idempotency-Key": "order-42"})
    retry = await _reserve(client, resource_id, **{"Idempotency-Key": "order-42"})
    assert first.status_code == retry.status_code == 201
    assert retry.json()["id"] == first.json()["id"] and retry.headers["Idempotent-Replayed"] == "true"
    reused = await _reserve(client, resource_id, 2, **{"Idempotency-Key": "order-42"})
    assert (reused.status_code, reused.json()["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert (await client.get(f"/v1/resources/{resource_id}")).json()["reserved"] == 1


async def test_a_refusal_is_replayed_too(client):
    resource_id = await post_resource(client, 0)
    first = await _reserve(client, resource_id, **{"Idempotency-Key": "k"})
    await client.patch(f"/v1/resources/{resource_id}", json={"capacity": 5})
    retry = await _reserve(client, resource_id, **{"Idempotency-Key": "k"})
    assert first.json()["code"] == retry.json()["code"] == "RESOURCE_FULL"
    assert retry.headers["Idempotent-Replayed"] == "true"


async def test_concurrent_retries_with_one_key_book_once(live_server):
    async with httpx.AsyncClient(base_url=live_server, headers=admin_headers(), timeout=60) as http:
        resource_id = await post_resource(http, 10)
        answers = await asyncio.gather(
            *(_reserve(http, resource_id, **{"Idempotency-Key": "same"}) for _ in range(10))
        )
        assert {a.status_code for a in answers} == {201}
        assert len({a.json()["id"] for a in answers}) == 1
        assert (await http.get(f"/v1/resources/{resource_id}")).json()["reserved"] == 1


async def test_waiting_list_in_strict_order_with_expiring_holds(client, services, clock):
    resource_id = await post_resource(client, 1)
    taken = (await _reserve(client, resource_id, client="first")).json()
    join = {"resource_id": resource_id, "quantity": 1}
    ana = (
        await client.post(
            "/v1/waiting-list/join", json={**join, "client_id": "ana", "contact": "+221770000010"}
        )
    ).json()
    clock.advance(1)
    ben = (await client.post("/v1/waiting-list/join", json={**join, "client_id": "ben"})).json()
    assert ana["status"] == ben["status"] == "WAITING"

    await client.post(f"/v1/reservations/{taken['id']}/cancel")

    ana = (await client.get(f"/v1/waiting-list/{ana['id']}")).json()
    assert ana["status"] == "OFFERED" and ana["hold_expires_at"]
    assert (await _reserve(client, resource_id, client="newcomer")).json()["code"] == "RESOURCE_FULL"
    async with services.db.read() as session:
        [told] = (
            await session.scalars(select(Notification).where(Notification.category == "waiting_list_offer"))
        ).all()
    assert told.recipient == "+221770000010" and "PLACE DISPONIBLE" in told.body

    clock.advance(900)
    handled = await services.sweeper.run_once()
    assert handled["waiting_list_hold"] == 1
    async with services.db.read() as session:
        told = await session.get(Notification, told.id, populate_existing=True)
    assert (told.status, told.cancel_reason) == ("CANCELLED", "hold lapsed")  # never sent once moot
    assert (await client.get(f"/v1/waiting-list/{ana['id']}")).json()["status"] == "EXPIRED"
    late = await client.post(f"/v1/waiting-list/{ana['id']}/confirm")
    assert late.json()["code"] == "INVALID_STATE"
    assert (await client.get(f"/v1/waiting-list/{ben['id']}")).json()["status"] == "OFFERED"

    confirmed = await client.post(f"/v1/waiting-list/{ben['id']}/confirm")
    assert confirmed.status_code == 201 and confirmed.json()["waiting_list_entry_id"] == ben["id"]
    resource = (await client.get(f"/v1/resources/{resource_id}")).json()
    assert (resource["reserved"], resource["held"], resource["available"]) == (1, 0, 0)


async def test_joining_is_refused_while_places_are_free(client):
    resource_id = await post_resource(client, 3)
    refused = await client.post("/v1/waiting-list/join", json={"resource_id": resource_id, "client_id": "x"})
    assert (refused.status_code, refused.json()["code"]) == (409, "INVALID_STATE")


async def test_leaving_an_offer_and_resizing_up_serve_the_next_entries(client, clock):
    resource_id = await post_resource(client, 1)
    await _reserve(client, resource_id)
    entries = []
    for n in range(3):
        clock.advance(0.001)  # server timestamps decide the order
        joined = await client.post(
            "/v1/waiting-list/join", json={"resource_id": resource_id, "client_id": f"w{n}"}
        )
        entries.append(joined.json())
    await client.patch(f"/v1/resources/{resource_id}", json={"capacity": 2})
    assert (await client.get(f"/v1/waiting-list/{entries[0]['id']}")).json()["status"] == "OFFERED"
    left = await client.delete(f"/v1/waiting-list/{entries[0]['id']}")
    assert left.json()["status"] == "LEFT"
    statuses = [(await client.get(f"/v1/waiting-list/{e['id']}")).json()["status"] for e in entries]
    assert statuses == ["LEFT", "OFFERED", "WAITING"]


async def test_availability_is_cached_and_invalidated_by_commits(client):
    resource_id = await post_resource(client, 3)
    first = await client.get("/v1/availability", params={"resource_id": resource_id})
    second = await client.get("/v1/availability", params={"resource_id": resource_id})
    assert (first.headers["X-Cache-Status"], second.headers["X-Cache-Status"]) == ("MISS", "HIT")
    await _reserve(client, resource_id)
    third = await client.get("/v1/availability", params={"resource_id": resource_id})
    assert third.headers["X-Cache-Status"] == "MISS" and third.json()["available"] == 2


async def test_admin_actions_are_audited_with_before_and_after(client):
    resource_id = await post_resource(client, 4)
    await client.patch(f"/v1/resources/{resource_id}", json={"capacity": 6})
    await client.post(f"/v1/resources/{resource_id}/close")
    await client.post(f"/v1/resources/{resource_id}/reopen")
    audit = (await client.get("/v1/audit", params={"target_id": resource_id})).json()
    assert [a["action"] for a in audit] == [
        "resource.create",
        "resource.resize",
        "resource.closed",
        "resource.reopened",
    ]
    resize = audit[1]
    assert (resize["before"]["capacity"], resize["after"]["capacity"]) == (4, 6)
    assert resize["actor"].startswith("admin:key_")
    integration = (await post_api_key(client, "integration"))["key"]
    forbidden = await client.get("/v1/audit", headers={"Authorization": f"Bearer {integration}"})
    assert forbidden.json()["code"] == "FORBIDDEN"


async def test_export_streams_every_reservation_as_csv(client, clock):
    resource_id = await post_resource(client, 5)
    for n in range(3):
        clock.advance(0.001)
        await _reserve(client, resource_id, client=f"c{n}")
    export = await client.get("/v1/reservations/export.csv", params={"resource_id": resource_id})
    assert export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["client_id"] for r in rows] == ["c0", "c1", "c2"] and {r["status"] for r in rows} == {
        "CONFIRMED"
    }


async def test_rate_limit_per_api_key(services, settings, clock):
    from dispatchd.app import build_services, create_app
    from tests.conftest import make_settings

    limited = make_settings(settings.database_url, rate_limit="3/minute")
    own = build_services(limited, clock)  # the limiter is built from the settings, with the domain
    app = create_app(limited, clock=clock, run_migrations=False, background=False, services=own)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=admin_headers()
    ) as http:
        resource_id = await post_resource(http, 10)
        answers = [await _reserve(http, resource_id) for _ in range(4)]
    assert [a.status_code for a in answers] == [201, 201, 201, 429]
    assert answers[3].json()["code"] == "RATE_LIMITED" and int(answers[3].headers["Retry-After"]) >= 1
    await own.db.dispose()


async def test_security_headers_and_metrics(client):
    resource_id = await post_resource(client, 1)
    response = await _reserve(client, resource_id)
    assert (
        response.headers["X-Frame-Options"] == "DENY"
        and response.headers["X-Content-Type-Options"] == "nosniff"
    )
    before = (await client.get("/metrics")).text
    assert (await _reserve(client, resource_id)).json()["code"] == "RESOURCE_FULL"
    await post_resource(client, 4)  # a second OPEN resource, empty
    after = (await client.get("/metrics")).text
    # counters are process-wide: the first reservation counted before ``before`` was read
    assert sample(after, "reservations_total") == sample(before, "reservations_total")
    assert sample(after, "rejections_total", code="RESOURCE_FULL") == (
        sample(before, "rejections_total", code="RESOURCE_FULL") + 1
    )
    assert (
        sample(after, "commit_duration_seconds_count") == sample(before, "commit_duration_seconds_count") + 1
    )
    # gauges are refreshed at each scrape from the database: 1 of 1 place, then 1 of 5 over two resources
    assert (sample(before, "active_resources"), sample(before, "capacity_utilization")) == (1, 1.0)
    assert (sample(after, "active_resources"), sample(after, "capacity_utilization")) == (2, 0.2)
    assert (await _reserve(client, await post_resource(client, 1))).status_code == 201
    assert sample((await client.get("/metrics")).text, "reservations_total") == (
        sample(after, "reservations_total") + 1
    )


async def test_service_refuses_a_full_then_a_closed_resource_with_its_event(services):
    reservations = services.reservations
    resource = await create_resource(services, 1, type="slot", name="x")
    first = await reservations.reserve(resource.id, "a", 1)
    assert first.reservation is not None and first.refusal is None

    full = await reservations.reserve(resource.id, "b", 2)
    assert (full.reservation, full.refusal, full.detail) == (None, "RESOURCE_FULL", "2 asked, 0 free")
    assert REFUSALS[full.refusal] is ResourceFull

    await reservations.close(resource.id, "admin")
    closed = await reservations.reserve(resource.id, "c", 1)
    assert (closed.refusal, closed.detail) == ("RESOURCE_CLOSED", f"resource {resource.id} is closed")

    rejected = [e.data for e in await reservations.timeline(resource.id) if e.type == "ReservationRejected"]
    assert [(e["code"], e["client_id"], e["quantity"], e["reserved"]) for e in rejected] == [
        ("RESOURCE_FULL", "b", 2, 1),
        ("RESOURCE_CLOSED", "c", 1, 1),
    ]
    assert (await reservations.get_resource(resource.id)).reserved == 1  # refusals changed nothing


async def test_a_client_joining_behind_an_offer_is_offered_the_free_place(client, clock):
    """Found by the hypothesis state machine: capacity 0, A joins, resize to 2 (A offered), B joins —
    B was left WAITING with a place free, and a direct buyer could take it."""
    resource_id = await post_resource(client, 0)
    first = (
        await client.post("/v1/waiting-list/join", json={"resource_id": resource_id, "client_id": "A"})
    ).json()
    await client.patch(f"/v1/resources/{resource_id}", json={"capacity": 2})
    clock.advance(0.001)
    second = (
        await client.post("/v1/waiting-list/join", json={"resource_id": resource_id, "client_id": "B"})
    ).json()
    assert (await client.get(f"/v1/waiting-list/{first['id']}")).json()["status"] == "OFFERED"
    assert second["status"] == "OFFERED"
    assert (await _reserve(client, resource_id, client="newcomer")).json()["code"] == "RESOURCE_FULL"
