"""First accept wins, exactly once, through a real HTTP server (uvicorn, loopback), SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import admin_headers
from tests.factories import post_booking, post_driver_with_key


async def _searching_booking(http: httpx.AsyncClient) -> str:
    booking = await post_booking(http)
    started = await http.post(f"/v1/bookings/{booking['id']}/matching", json={})
    assert started.status_code == 200, started.text
    return booking["id"]


async def _accept(http: httpx.AsyncClient, booking_id: str, driver_id: str, key: str, barrier=None) -> dict:
    """The driver (with its own key) accepts; waits at ``barrier`` first so that all go at once."""
    if barrier is not None:
        await barrier.wait()
    answer = await http.post(
        f"/v1/bookings/{booking_id}/responses",
        json={"driver_id": driver_id, "type": "ACCEPT"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.parametrize("contenders", [2, 3, 50])
async def test_simultaneous_accepts_have_exactly_one_winner(live_server, contenders):
    limits = httpx.Limits(max_connections=contenders + 5)
    async with httpx.AsyncClient(
        base_url=live_server, headers=admin_headers(), limits=limits, timeout=60
    ) as http:
        drivers = [await post_driver_with_key(http) for _ in range(contenders)]
        booking_id = await _searching_booking(http)
        barrier = asyncio.Barrier(contenders)

        results = await asyncio.gather(*(_accept(http, booking_id, d, k, barrier) for d, k in drivers))

        winners = [r for r in results if r["action"] == "ASSIGNED"]
        assert len(winners) == 1 and winners[0]["success"] is True
        assert all(
            r["action"] == "ALREADY_TAKEN" and r["success"] is False for r in results if r not in winners
        )
        booking = (await http.get(f"/v1/bookings/{booking_id}")).json()
        assert (booking["status"], booking["driver_id"]) == ("ASSIGNED", winners[0]["driver_id"])
        offers = (await http.get(f"/v1/bookings/{booking_id}/offers")).json()
        assert [o["response"] for o in offers].count("ACCEPTED") == 1
        assert all(o["driver_answer"] == "ACCEPT" for o in offers)
        busy = [d for d, _ in drivers if (await http.get(f"/v1/drivers/{d}")).json()["status"] == "BUSY"]
        assert busy == [winners[0]["driver_id"]]


async def test_one_driver_accepting_two_bookings_at_once_wins_at_most_one(live_server):
    async with httpx.AsyncClient(base_url=live_server, headers=admin_headers(), timeout=60) as http:
        driver_id, key = await post_driver_with_key(http)
        bookings = [await _searching_booking(http) for _ in range(5)]
        barrier = asyncio.Barrier(len(bookings))

        answers = await asyncio.gather(*(_accept(http, b, driver_id, key, barrier) for b in bookings))
        actions = [a["action"] for a in answers]

        assert actions.count("ASSIGNED") == 1
        assert set(actions) == {"ASSIGNED", "DRIVER_BUSY"}
        statuses = [(await http.get(f"/v1/bookings/{b}")).json()["status"] for b in bookings]
        assert statuses.count("ASSIGNED") == 1 and statuses.count("SEARCHING") == 4


async def test_many_bookings_and_drivers_racing_never_double_assign(live_server):
    """20 bookings x 10 drivers, every driver accepting every booking at once."""
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(
        base_url=live_server, headers=admin_headers(), limits=limits, timeout=120
    ) as http:
        drivers = [await post_driver_with_key(http) for _ in range(10)]
        bookings = [await _searching_booking(http) for _ in range(20)]

        pairs = [(b, d, k) for b in bookings for d, k in drivers]
        answers = await asyncio.gather(*(_accept(http, b, d, k) for b, d, k in pairs))

        won = [
            (b, d) for (b, d, _), answer in zip(pairs, answers, strict=True) if answer["action"] == "ASSIGNED"
        ]
        assert len(won) == 10  # every driver ends with exactly one booking: 10 drivers, 20 bookings
        assert len({b for b, _ in won}) == len(won) and len({d for _, d in won}) == len(won)
        for booking_id in bookings:
            booking = (await http.get(f"/v1/bookings/{booking_id}")).json()
            expected = [d for b, d in won if b == booking_id]
            assert booking["driver_id"] == (expected[0] if expected else None)
