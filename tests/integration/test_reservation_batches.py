"""Group commit (issue 11): concurrent reserve requests for one resource are admitted together, and each
gets the answer it would have got alone, in arrival order — on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from dispatchd.assembly import build_services
from dispatchd.core.errors import InvalidInput, NotFound
from dispatchd.reservations.models import Reservation
from dispatchd.reservations.service import Idempotency, ReservationService
from tests.factories import create_resource


def batches() -> tuple[float, float]:
    """(commits, requests admitted) so far, from the batch-size histogram."""
    count = REGISTRY.get_sample_value("dispatchd_reservation_batch_size_count") or 0.0
    total = REGISTRY.get_sample_value("dispatchd_reservation_batch_size_sum") or 0.0
    return count, total


def shape(outcome) -> tuple:
    """What a caller sees of an outcome or an error."""
    if isinstance(outcome, Exception):
        return ("error", getattr(outcome, "code", type(outcome).__name__))
    if outcome.reservation is not None:
        return ("CONFIRMED", outcome.reservation.quantity, outcome.replayed)
    return (outcome.refusal, outcome.replayed)


async def reserved_in_rows(services, resource_id: str) -> int:
    async with services.db.read() as session:
        return int(
            await session.scalar(
                select(func.coalesce(func.sum(Reservation.quantity), 0)).where(
                    Reservation.resource_id == resource_id, Reservation.status == "CONFIRMED"
                )
            )
        )


async def test_a_batch_straddling_capacity_confirms_in_arrival_order_what_fits(services):
    reservations = services.reservations
    resource = await create_resource(services, 5)
    quantities = [2, 2, 3, 1, 1, 2, 1]
    commits, admitted = batches()

    outcomes = await asyncio.gather(
        *(reservations.reserve(resource.id, f"c{n}", q) for n, q in enumerate(quantities))
    )

    # Alone, in this order: 2 (2), 2 (4), 3 refused (1 free), 1 (5), then full.
    assert [shape(o) for o in outcomes] == [
        ("CONFIRMED", 2, False),
        ("CONFIRMED", 2, False),
        ("RESOURCE_FULL", False),
        ("CONFIRMED", 1, False),
        ("RESOURCE_FULL", False),
        ("RESOURCE_FULL", False),
        ("RESOURCE_FULL", False),
    ]
    assert batches() == (commits + 1, admitted + len(quantities))  # one transaction for all seven
    after = await reservations.get_resource(resource.id)
    assert (after.reserved, after.version) == (5, resource.version + 3)
    assert await reserved_in_rows(services, resource.id) == 5
    timeline = await reservations.timeline(resource.id)
    decided = [(e.type, e.data["client_id"], e.data["reserved"], e.data["version"]) for e in timeline[1:]]
    assert decided == [
        ("ReservationConfirmed", "c0", 2, resource.version + 1),
        ("ReservationConfirmed", "c1", 4, resource.version + 2),
        ("ReservationRejected", "c2", 4, resource.version + 2),
        ("ReservationConfirmed", "c3", 5, resource.version + 3),
        ("ReservationRejected", "c4", 5, resource.version + 3),
        ("ReservationRejected", "c5", 5, resource.version + 3),
        ("ReservationRejected", "c6", 5, resource.version + 3),
    ]


async def test_idempotent_retries_inside_one_batch_get_the_first_answer(services):
    reservations = services.reservations
    resource = await create_resource(services, 3)
    same = Idempotency("key-1:retry", "body-a")
    other_body = Idempotency("key-1:retry", "body-b")
    refused_twice = Idempotency("key-1:late", "body-c")

    outcomes = await asyncio.gather(
        reservations.reserve(resource.id, "a", 2, same),
        reservations.reserve(resource.id, "a", 2, same),  # the client's retry, in the same batch
        reservations.reserve(resource.id, "b", 1, other_body),  # same key, another body
        reservations.reserve(resource.id, "c", 1),
        reservations.reserve(resource.id, "d", 5, refused_twice),
        reservations.reserve(resource.id, "d", 5, refused_twice),
        return_exceptions=True,
    )

    assert [shape(o) for o in outcomes] == [
        ("CONFIRMED", 2, False),
        ("CONFIRMED", 2, True),
        ("error", "IDEMPOTENCY_KEY_REUSED"),
        ("CONFIRMED", 1, False),
        ("RESOURCE_FULL", False),
        ("RESOURCE_FULL", True),
    ]
    assert isinstance(outcomes[2], InvalidInput)
    assert outcomes[0].reservation.id == outcomes[1].reservation.id
    assert (await reservations.get_resource(resource.id)).reserved == 3
    assert await reserved_in_rows(services, resource.id) == 3

    # A later batch of retries is answered from the stored outcomes, and books nothing more.
    again = await asyncio.gather(
        reservations.reserve(resource.id, "a", 2, same),
        reservations.reserve(resource.id, "d", 5, refused_twice),
        reservations.reserve(resource.id, "a", 2, Idempotency("key-1:retry", "body-z")),
        return_exceptions=True,
    )
    assert [shape(o) for o in again] == [
        ("CONFIRMED", 2, True),
        ("RESOURCE_FULL", True),
        ("error", "IDEMPOTENCY_KEY_REUSED"),
    ]
    assert again[0].reservation.id == outcomes[0].reservation.id
    assert (await reservations.get_resource(resource.id)).reserved == 3


async def test_a_close_between_batches_refuses_everything_after_it(services):
    reservations = services.reservations
    services.reservations.commit.admissions.batch_max = 8
    resource = await create_resource(services, 10_000)
    tasks = [asyncio.create_task(reservations.reserve(resource.id, f"c{n}", 1)) for n in range(200)]

    await tasks[0]  # the first batch is committed; the others queue behind it and behind the close
    await reservations.close(resource.id, "admin")
    outcomes = await asyncio.gather(*tasks)

    codes = [o.refusal or "CONFIRMED" for o in outcomes]
    first_closed = codes.index("RESOURCE_CLOSED")
    assert 8 <= first_closed < 200
    assert set(codes[:first_closed]) == {"CONFIRMED"}
    assert set(codes[first_closed:]) == {"RESOURCE_CLOSED"}
    timeline = [e.type for e in await reservations.timeline(resource.id)]
    closed_at = timeline.index("ResourceClosed")
    assert "ReservationConfirmed" not in timeline[closed_at:]
    assert timeline.count("ReservationConfirmed") == first_closed
    assert (await reservations.get_resource(resource.id)).reserved == first_closed
    assert await reserved_in_rows(services, resource.id) == first_closed


async def test_batches_equal_the_same_requests_committed_one_by_one(services):
    """30 random sequences: the batched answers, counts and events equal a serial run's."""
    reservations = services.reservations
    serial = ReservationService(services.db, reservations.config)
    rng = random.Random(11)
    for case in range(30):
        capacity = rng.randint(0, 12)
        requests = [
            (
                rng.randint(1, 4),
                rng.choice([None, None, "k0", "k1", "k2"]),
                rng.choice(["a", "a", "b"]),  # the body: the same key with another body is a reuse
            )
            for _ in range(rng.randint(1, 16))
        ]
        batched_resource = await create_resource(services, capacity)
        serial_resource = await create_resource(services, capacity)

        def idem(run: str, key: str | None, body: str, q: int, case: int = case) -> Idempotency | None:
            return None if key is None else Idempotency(f"{run}{case}:{key}", f"{body}{q}")

        batched = await asyncio.gather(
            *(
                reservations.reserve(batched_resource.id, body, q, idem("batch", key, body, q))
                for q, key, body in requests
            ),
            return_exceptions=True,
        )
        alone = []
        for q, key, body in requests:
            try:
                alone.append(
                    await serial.commit.reserve_alone(
                        serial_resource.id, body, q, idem("serial", key, body, q)
                    )
                )
            except InvalidInput as error:
                alone.append(error)

        assert [shape(o) for o in batched] == [shape(o) for o in alone], (capacity, requests)
        one = await reservations.get_resource(batched_resource.id)
        other = await reservations.get_resource(serial_resource.id)
        assert (one.reserved, one.version - batched_resource.version) == (
            other.reserved,
            other.version - serial_resource.version,
        )
        events = [
            [
                (e.type, e.data.get("quantity"), e.data.get("reserved"))
                for e in await reservations.timeline(r.id)
            ]
            for r in (batched_resource, serial_resource)
        ]
        assert events[0] == events[1]


async def test_an_unknown_resource_fails_only_its_own_batch(services):
    reservations = services.reservations
    resource = await create_resource(services, 2)
    outcomes = await asyncio.gather(
        reservations.reserve("res_missing", "a", 1),
        reservations.reserve(resource.id, "b", 1),
        reservations.reserve("res_missing", "c", 1),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], NotFound) and outcomes[0].code == "RESOURCE_NOT_FOUND"
    assert isinstance(outcomes[2], NotFound)
    assert shape(outcomes[1]) == ("CONFIRMED", 1, False)


async def test_one_request_the_database_refuses_does_not_fail_its_neighbours(services, backend):
    reservations = services.reservations
    resource = await create_resource(services, 10)
    too_long = "x" * 300  # the column holds 200 characters: PostgreSQL refuses the row, SQLite keeps it
    outcomes = await asyncio.gather(
        reservations.reserve(resource.id, "a", 1),
        reservations.reserve(resource.id, too_long, 1),
        reservations.reserve(resource.id, "c", 1),
        return_exceptions=True,
    )
    assert shape(outcomes[0]) == shape(outcomes[2]) == ("CONFIRMED", 1, False)
    if backend == "postgres":
        assert isinstance(outcomes[1], Exception)
        expected = 2
    else:
        assert shape(outcomes[1]) == ("CONFIRMED", 1, False)
        expected = 3
    assert (await reservations.get_resource(resource.id)).reserved == expected
    assert await reserved_in_rows(services, resource.id) == expected


@pytest.mark.parametrize("buyers", [300])
async def test_two_instances_each_batching_never_overbook_one_resource(services, settings, clock, buyers):
    """Two service instances (their own engines, pools and admission lanes) on one database, each
    batching its half of the buyers: never overbooked, every confirmed place is a row."""
    other = build_services(settings, clock)
    try:
        resource = await create_resource(services, 200)
        quantities = [1 + n % 2 for n in range(buyers)]
        commits, admitted = batches()
        outcomes = await asyncio.gather(
            *(
                (services if n % 2 else other).reservations.reserve(resource.id, f"c{n}", q)
                for n, q in enumerate(quantities)
            )
        )
        confirmed = sum(o.reservation.quantity for o in outcomes if o.reservation is not None)
        assert confirmed == 200  # enough demand for every place, none more
        assert {o.refusal for o in outcomes if o.reservation is None} == {"RESOURCE_FULL"}
        assert (await services.reservations.get_resource(resource.id)).reserved == 200
        assert await reserved_in_rows(services, resource.id) == 200
        count, total = batches()
        assert total - admitted == buyers
        assert count - commits < buyers / 4  # batched: far fewer commits than requests
    finally:
        await other.aclose()
