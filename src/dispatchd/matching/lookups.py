"""Reads every matching module makes inside a unit of work: the transaction's clock, a booking or a driver
(or 404), the phones of some drivers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.rows import get_or_404
from dispatchd.matching.models import Booking, Driver


def now(session: AsyncSession) -> datetime:
    """The unit of work's "now" (UTC, set once by :class:`~dispatchd.core.db.Database`): every deadline
    and timestamp of one transaction uses the same instant."""
    return session.info["now"]


async def booking_or_404(session: AsyncSession, booking_id: str, *, lock: bool = False) -> Booking:
    """The booking, fresh (and locked when ``lock``). Raises :class:`NotFound` (BOOKING_NOT_FOUND)."""
    return await get_or_404(session, Booking, booking_id, code="BOOKING_NOT_FOUND", what="booking", lock=lock)


async def driver_or_404(session: AsyncSession, driver_id: str, *, lock: bool = False) -> Driver:
    """The driver, fresh (and locked when ``lock``). Raises :class:`NotFound` (DRIVER_NOT_FOUND)."""
    return await get_or_404(session, Driver, driver_id, code="DRIVER_NOT_FOUND", what="driver", lock=lock)


async def phones(session: AsyncSession, driver_ids: Sequence[str]) -> list[str]:
    """The phones (E.164) of these drivers, in driver id order."""
    rows = await session.scalars(select(Driver.phone).where(Driver.id.in_(driver_ids)).order_by(Driver.id))
    return list(rows.all())
