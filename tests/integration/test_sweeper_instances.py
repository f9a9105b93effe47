"""Several instances share the deadlines: each due row is handled exactly once."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from dispatchd.app import build_services
from dispatchd.matching.models import MatchingMetrics
from tests.factories import create_bookings, create_drivers


async def test_two_sweepers_handle_each_due_offer_exactly_once(services, settings, clock):
    matching = services.matching
    await create_drivers(services, 20)
    bookings = await create_bookings(services, 10)
    for booking in bookings:
        await matching.start_matching(booking.id)
    clock.advance(31)

    other = build_services(settings, clock)  # a second instance on the same database
    try:
        services.sweeper.batch_size = other.sweeper.batch_size = 7
        results = await asyncio.gather(services.sweeper.run_once(), other.sweeper.run_once())
    finally:
        await other.db.dispose()

    assert sum(r["offer_expiry"] for r in results) == 200
    async with services.db.read() as session:
        timeouts = await session.scalar(select(func.sum(MatchingMetrics.total_timeouts)))
    assert timeouts == 200
    for booking in bookings:
        assert {o.response for o in await matching.list_offers(booking.id)} == {"TIMEOUT"}
