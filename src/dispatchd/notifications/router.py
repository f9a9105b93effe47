"""HTTP routes of the outbox (read side), under ``/v1``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict

from dispatchd.core.auth import Principal
from dispatchd.core.db import Database
from dispatchd.core.schemas import UtcDateTime
from dispatchd.deps import database, principal
from dispatchd.notifications import outbox
from dispatchd.notifications.models import NotificationStatus

router = APIRouter(prefix="/v1", tags=["notifications"])


class NotificationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    category: str
    recipient: str
    body: str
    payload: dict | None
    subject: str | None
    status: NotificationStatus
    channel: str | None
    attempts: int
    next_attempt_at: datetime | None
    expires_at: datetime | None
    provider_message_id: str | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


class NotificationPage(BaseModel):
    notifications: list[NotificationOut]
    total: int


@router.get("/notifications", response_model=NotificationPage, summary="Outgoing messages, newest first")
async def list_notifications(
    status: NotificationStatus | None = None,
    category: str | None = None,
    recipient: str | None = None,
    booking_id: str | None = Query(None, description="Messages about this booking"),
    created_from: Annotated[UtcDateTime | None, Query(alias="from")] = None,
    created_to: Annotated[UtcDateTime | None, Query(alias="to")] = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=2**31),
    who: Principal = Depends(principal),
    db: Database = Depends(database),
):
    who.require_staff()
    async with db.read() as session:
        rows, total = await outbox.list_notifications(
            session,
            status=status.value if status else None,
            category=category,
            recipient=recipient,
            subject=f"booking:{booking_id}" if booking_id else None,
            created_from=created_from,
            created_to=created_to,
            limit=limit,
            offset=offset,
        )
    return NotificationPage(notifications=[NotificationOut.model_validate(r) for r in rows], total=total)
