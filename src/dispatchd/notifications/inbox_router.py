"""HTTP routes of the inbound inbox, under ``/v1/inbound`` (staff keys): what customers and drivers
wrote, where each message went, and the ones no handler took (UNROUTED) or that failed (FAILED)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from dispatchd.core.auth import Principal
from dispatchd.core.db import Database
from dispatchd.core.rows import get_or_404
from dispatchd.core.schemas import UtcDateTime
from dispatchd.deps import database, principal
from dispatchd.notifications import inbox
from dispatchd.notifications.models import InboundMessage, RoutingStatus

router = APIRouter(prefix="/v1/inbound", tags=["inbound"])


class InboundOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    provider_message_id: str
    from_phone: str
    type: str
    text: str | None
    button_id: str | None
    context_message_id: str | None
    sent_at: datetime | None
    received_at: datetime
    routing_status: RoutingStatus
    handler: str | None
    outcome: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    routed_at: datetime | None


class InboundPage(BaseModel):
    messages: list[InboundOut]
    total: int


@router.get("", response_model=InboundPage, summary="Inbound messages, newest first, with filters")
async def list_inbound(
    routing_status: RoutingStatus | None = Query(None, description="PENDING, ROUTED, UNROUTED or FAILED"),
    from_phone: str | None = Query(None, max_length=40, description="The sender, E.164 (+225…)"),
    handler: str | None = Query(None, max_length=40, description="The handler that took it"),
    outcome: str | None = Query(None, max_length=200),
    received_from: Annotated[UtcDateTime | None, Query(alias="from")] = None,
    received_to: Annotated[UtcDateTime | None, Query(alias="to")] = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=2**31),
    who: Principal = Depends(principal),
    db: Database = Depends(database),
) -> InboundPage:
    """Staff only (403 otherwise). ``from``/``to`` bound ``received_at`` (UTC, ``to`` exclusive)."""
    who.require_staff()
    conditions = []
    if routing_status is not None:
        conditions.append(InboundMessage.routing_status == routing_status.value)
    if from_phone is not None:
        conditions.append(InboundMessage.from_phone == from_phone)
    if handler is not None:
        conditions.append(InboundMessage.handler == handler)
    if outcome is not None:
        conditions.append(InboundMessage.outcome == outcome)
    if received_from is not None:
        conditions.append(InboundMessage.received_at >= received_from)
    if received_to is not None:
        conditions.append(InboundMessage.received_at < received_to)
    async with db.read() as session:
        total = await session.scalar(select(func.count()).select_from(InboundMessage).where(*conditions))
        rows = await session.scalars(
            select(InboundMessage)
            .where(*conditions)
            .order_by(InboundMessage.received_at.desc(), InboundMessage.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return InboundPage(
            messages=[InboundOut.model_validate(row) for row in rows.all()], total=int(total or 0)
        )


@router.get("/{inbound_id}", response_model=InboundOut, summary="One inbound message")
async def get_inbound(
    inbound_id: str, who: Principal = Depends(principal), db: Database = Depends(database)
) -> InboundOut:
    """Staff only. Raises 404 INBOUND_MESSAGE_NOT_FOUND."""
    who.require_staff()
    async with db.read() as session:
        row = await get_or_404(
            session, InboundMessage, inbound_id, code="INBOUND_MESSAGE_NOT_FOUND", what="inbound message"
        )
        return InboundOut.model_validate(row)


@router.post(
    "/{inbound_id}/retry", response_model=InboundOut, summary="Route a FAILED or UNROUTED message again"
)
async def retry_inbound(
    inbound_id: str, who: Principal = Depends(principal), db: Database = Depends(database)
) -> InboundOut:
    """Staff only. The message is PENDING again, due now, with a fresh attempt count; the sweeper routes
    it at its next tick. Raises 404 INBOUND_MESSAGE_NOT_FOUND, 409 INVALID_STATE (ROUTED or PENDING)."""
    who.require_staff()
    async with db.transaction() as session:
        row = await inbox.retry(session, inbound_id, session.info["now"])
        return InboundOut.model_validate(row)
