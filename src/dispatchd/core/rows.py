"""The one get-or-404 reader every domain uses: a row by primary key, optionally locked, or a
:class:`~dispatchd.core.errors.NotFound` with the domain's specific code (``BOOKING_NOT_FOUND``,
``RESOURCE_NOT_FOUND``, ``NOTIFICATION_NOT_FOUND``…)."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import lock_for_update
from dispatchd.core.errors import NotFound

Row = TypeVar("Row")


async def get_or_404(
    session: AsyncSession, model: type[Row], row_id: str, *, code: str, what: str, lock: bool = False
) -> Row:
    """``model`` row ``row_id``, fresh from the database (``populate_existing``), locked ``FOR NO KEY
    UPDATE`` on PostgreSQL when ``lock``. Raises :class:`NotFound` with ``code`` ("``what`` <id> not
    found")."""
    query = select(model).where(model.id == row_id).execution_options(populate_existing=True)  # type: ignore[attr-defined]
    if lock:
        query = lock_for_update(query)
    row = await session.scalar(query)
    if row is None:
        raise NotFound(f"{what} {row_id} not found", code=code)
    return row
