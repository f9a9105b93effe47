"""Bulk inserts (issue 11), SQLite and PostgreSQL: :func:`dispatchd.core.bulk.insert_many` stores exactly
what a Core insert stores (UTC datetimes, JSON, NULLs), through COPY / executemany, in the caller's
transaction (a rollback leaves nothing); a broadcast's offers and events read back as written.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from dispatchd.core import bulk, events
from dispatchd.core.events import Event
from dispatchd.matching.models import BookingOffer
from tests.factories import create_booking, create_drivers

AT = datetime(2026, 11, 30, 18, 0, 0, 123456, tzinfo=UTC)


def _rows(count: int, start: int = 0) -> list[tuple]:
    return [
        (f"driver:drv_{i:05d}", "OfferSent", {"i": i, "é": "Départ", "none": None, "nested": [1.5, {"a": i}]})
        for i in range(start, start + count)
    ]


async def _read_events(db) -> list[tuple]:
    async with db.read() as session:
        rows = (await session.execute(select(Event).order_by(Event.id))).scalars().all()
    return [(e.topic, e.type, e.data, e.created_at) for e in rows]


@pytest.mark.parametrize("count", [3, bulk.COPY_MIN_ROWS + 7])
async def test_insert_many_stores_what_a_core_insert_stores(services, count, backend, monkeypatch):
    db = services.db
    fallbacks = []
    core_insert = bulk._core_insert

    async def counted(*args, **kwargs):
        fallbacks.append(len(args[3]))
        await core_insert(*args, **kwargs)

    monkeypatch.setattr(bulk, "_core_insert", counted)
    async with db.transaction() as session:
        before = await session.scalar(select(func.count()).select_from(Event))
        await session.execute(
            Event.__table__.insert(),
            [{"topic": t, "type": k, "data": d, "created_at": AT} for t, k, d in _rows(count)],
        )
        await bulk.insert_many(
            session, Event.__table__, ("topic", "type", "data"), _rows(count), shared={"created_at": AT}
        )
        later = AT + timedelta(seconds=1)
        await bulk.insert_many(
            session,
            Event.__table__,
            ("topic", "type", "data", "created_at"),
            [(t, k, d, later) for t, k, d in _rows(count)],
        )
    # PostgreSQL: a Core insert below COPY_MIN_ROWS, COPY from it; SQLite: executemany, never the Core insert
    assert fallbacks == ([count, count] if backend == "postgres" and count < bulk.COPY_MIN_ROWS else [])
    stored = (await _read_events(db))[before:]
    core, shared, per_row = stored[:count], stored[count : 2 * count], stored[2 * count :]
    assert core == shared  # the same values, read back the same way
    assert [(t, k, d) for t, k, d, _ in per_row] == [(t, k, d) for t, k, d, _ in core]
    assert {c for *_, c in per_row} == {later}
    assert core[0][2] == {"i": 0, "é": "Départ", "none": None, "nested": [1.5, {"a": 0}]}
    assert core[0][3] == AT and core[0][3].tzinfo is not None


async def test_insert_many_is_part_of_the_callers_transaction(services):
    db = services.db
    async with db.read() as session:
        before = await session.scalar(select(func.count()).select_from(Event))
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            await session.execute(select(1))
            await bulk.insert_many(
                session,
                Event.__table__,
                ("topic", "type", "data"),
                _rows(bulk.COPY_MIN_ROWS),
                shared={"created_at": AT},
            )
            raise RuntimeError("roll back")
    async with db.read() as session:
        assert await session.scalar(select(func.count()).select_from(Event)) == before


async def test_a_broadcast_writes_its_offers_and_events_in_bulk(services, clock):
    drivers = await create_drivers(services, events.BULK_MIN_EVENTS + 5)
    booking = await create_booking(services)

    result = await services.matching.start_matching(booking.id)

    assert result.drivers_notified == len(drivers)
    offers = await services.matching.list_offers(booking.id)
    assert sorted(o.driver_id for o in offers) == sorted(d.id for d in drivers)
    now = clock.now()
    expires = now + timedelta(seconds=services.matching.config.offer_timeout_s)
    assert {(o.wave, o.method, o.sent_at, o.expires_at, o.response) for o in offers} == {
        (1, "WHATSAPP", now, expires, None)
    }
    async with services.db.read() as session:
        sent = (
            await session.scalars(select(Event).where(Event.type == "OfferSent").order_by(Event.id))
        ).all()
        ids = {o.driver_id: o.id for o in (await session.scalars(select(BookingOffer))).all()}
    assert len(sent) == len(drivers)
    assert [e.id for e in sent] == sorted(e.id for e in sent)
    for event in sent:
        driver_id = event.topic.removeprefix("driver:")
        assert event.data["offer_id"] == ids[driver_id]
        assert event.data["expires_at"] == expires.isoformat() and event.created_at == now


async def test_a_whole_second_is_stored_as_a_core_insert_stores_it(services):
    """A time with no microseconds (a manual clock's) compares as the Core insert's rows do: on SQLite the
    text must carry the dialect's ``.000000`` (without it, ``created_at >= :at`` missed the row)."""
    at = datetime(2026, 11, 30, 18, 0, 10, tzinfo=UTC)
    async with services.db.transaction() as session:
        before = await session.scalar(select(func.max(Event.id))) or 0
        await session.execute(
            Event.__table__.insert(), [{"topic": "t:core", "type": "X", "data": {}, "created_at": at}]
        )
        await bulk.insert_many(
            session,
            Event.__table__,
            ("topic", "type", "data"),
            [("t:bulk", "X", {})],
            shared={"created_at": at},
        )
    async with services.db.read() as session:
        found = (
            await session.scalars(
                select(Event.topic).where(Event.id > before, Event.created_at >= at).order_by(Event.id)
            )
        ).all()
    assert found == ["t:core", "t:bulk"]
