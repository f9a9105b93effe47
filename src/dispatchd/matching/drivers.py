"""Drivers (seed 000 §1): registration, profile and status changes, heartbeats, and freeing a driver at
the end of a trip. Every function works inside the caller's unit of work; ``DriverUpdated`` events go to
the driver's topic."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, topics
from dispatchd.core.errors import InvalidInput, InvalidState
from dispatchd.core.ids import new_id
from dispatchd.matching.lookups import driver_or_404, now
from dispatchd.matching.models import Booking, Driver, DriverStatus


async def create(session: AsyncSession, data: dict[str, Any]) -> Driver:
    """Insert a driver from ``data`` (as :class:`DriverCreate`), seen now. A known phone raises
    :class:`IntegrityError` at the flush (the caller turns it into a :class:`Conflict`)."""
    at = now(session)
    driver = Driver(
        id=new_id("drv"), created_at=at, updated_at=at, last_seen_at=at, current_booking_id=None, **data
    )
    session.add(driver)
    await session.flush()
    events.append(session, topics.driver(driver.id), "DriverUpdated", {"status": driver.status})
    return driver


async def list_drivers(session: AsyncSession, status: DriverStatus | None, limit: int) -> list[Driver]:
    """Drivers in creation order, optionally of one status, at most ``limit``."""
    query = select(Driver).order_by(Driver.created_at, Driver.id).limit(limit)
    if status:
        query = query.where(Driver.status == status.value)
    return list((await session.scalars(query)).all())


def check_status_change(changes: dict[str, Any]) -> None:
    """Raises :class:`InvalidInput` for status BUSY, which only the engine sets."""
    if changes.get("status") == DriverStatus.BUSY:
        raise InvalidInput("status BUSY is set by the engine when a driver wins a booking")


async def update(session: AsyncSession, driver_id: str, changes: dict[str, Any]) -> Driver:
    """Apply ``changes`` (status AVAILABLE/OFFLINE, position, profile); the driver is seen now.

    Raises :class:`InvalidInput` for status BUSY, :class:`NotFound` (DRIVER_NOT_FOUND),
    :class:`InvalidState` when a driver holding an active booking asks to become AVAILABLE; a phone
    already taken raises :class:`IntegrityError` at the flush.
    """
    check_status_change(changes)
    driver = await driver_or_404(session, driver_id, lock=True)
    if changes.get("status") == DriverStatus.AVAILABLE and driver.current_booking_id is not None:
        raise InvalidState(
            f"driver {driver_id} holds booking {driver.current_booking_id}; complete or cancel it"
        )
    for name, value in changes.items():
        setattr(driver, name, value)
    driver.updated_at = driver.last_seen_at = now(session)
    await session.flush()
    events.append(
        session,
        topics.driver(driver_id),
        "DriverUpdated",
        {"status": driver.status, "lat": driver.lat, "lon": driver.lon},
    )
    return driver


async def heartbeat(session: AsyncSession, driver_id: str, lat: float | None, lon: float | None) -> Driver:
    """``last_seen_at`` = now, and the position (WGS84 degrees) when both are given. Raises
    :class:`NotFound` (DRIVER_NOT_FOUND). No event: a heartbeat is not a state change."""
    driver = await driver_or_404(session, driver_id, lock=True)
    driver.last_seen_at = now(session)
    if lat is not None and lon is not None:
        driver.lat, driver.lon = lat, lon
    return driver


async def release(
    session: AsyncSession, booking: Booking, *, lat: float | None = None, lon: float | None = None
) -> Driver:
    """Free the booking's driver (AVAILABLE again if it was BUSY with this booking), at ``lat``/``lon``
    when given. Locks the driver: call it after the booking and its offers (lock order)."""
    at = now(session)
    driver = await driver_or_404(session, booking.driver_id, lock=True)
    if driver.current_booking_id == booking.id:
        driver.current_booking_id = None
        if driver.status == DriverStatus.BUSY:
            driver.status = DriverStatus.AVAILABLE.value
    if lat is not None and lon is not None:
        driver.lat, driver.lon = lat, lon
    driver.last_seen_at = driver.updated_at = at
    await session.flush()
    events.append(session, topics.driver(driver.id), "DriverUpdated", {"status": driver.status})
    return driver
