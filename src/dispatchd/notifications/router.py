"""HTTP routes of the outbox (read side), under ``/v1``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dispatchd.core.auth import Principal
from dispatchd.core.db import Database
from dispatchd.core.errors import InvalidInput
from dispatchd.core.phone import is_e164
from dispatchd.core.schemas import StrictModel, UtcDateTime
from dispatchd.deps import database, principal
from dispatchd.notifications import admin, outbox, report
from dispatchd.notifications.models import NotificationStatus
from dispatchd.notifications.outbox import Message

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
    priority: int
    cancel_reason: str | None
    carried_by: str | None
    channel: str | None
    attempts: int
    next_attempt_at: datetime | None
    expires_at: datetime | None
    provider_message_id: str | None
    last_error: str | None
    error_code: str | None
    error_kind: str | None
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    failed_at: datetime | None


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


class NotificationIn(StrictModel):
    """One message to send through the outbox (integrations: reminders, receipts, anything)."""

    recipient: str = Field(description="E.164 phone (WhatsApp) or email address", examples=["+221770000001"])
    category: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+$", examples=["colis_arrive"])
    body: str = Field(min_length=1, max_length=4096)
    expires_at: UtcDateTime | None = Field(default=None, description="Never delivered after this (TTL)")

    @field_validator("recipient")
    @classmethod
    def _recipient(cls, value: str) -> str:
        if not (is_e164(value) or ("@" in value and len(value) <= 200)):
            raise ValueError("must be an E.164 phone such as +221770000001 or an email address")
        return value


@router.post(
    "/notifications",
    status_code=201,
    response_model=NotificationOut,
    summary="Send a message (outbox)",
    responses={
        200: {
            "model": NotificationOut,
            "description": "A repeat with the same Idempotency-Key: the first message, Idempotent-Replayed",
        }
    },
)
async def send_notification(
    body: NotificationIn,
    response: Response,
    # stored as "<key id>:<key>" in 200 characters
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=160),
    who: Principal = Depends(principal),
    db: Database = Depends(database),
):
    """Written PENDING and delivered by the worker. With ``Idempotency-Key`` a repeat returns the first
    message (200, ``Idempotent-Replayed: true``) instead of writing a second one."""
    who.require_staff()
    key = f"{who.key_id}:{idempotency_key}" if idempotency_key else None
    message = Message(
        body.recipient, body.category, body.body, expires_at=body.expires_at, idempotency_key=key
    )
    row, created = await admin.enqueue_one(db, message)
    if not created:
        if (row.recipient, row.category, row.body) != (body.recipient, body.category, body.body):
            raise InvalidInput(
                "this Idempotency-Key was used for a different message", code="IDEMPOTENCY_KEY_REUSED"
            )
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return row


@router.post(
    "/notifications/{notification_id}/retry", response_model=NotificationOut, summary="Send again now"
)
async def retry_notification(
    notification_id: str, who: Principal = Depends(principal), db: Database = Depends(database)
):
    """A failed, expired or cancelled message goes back to PENDING with a fresh attempt budget."""
    who.require_staff()
    return await admin.retry_one(db, notification_id)


@router.post(
    "/notifications/{notification_id}/cancel",
    response_model=NotificationOut,
    summary="Cancel a message not yet sent",
)
async def cancel_notification(
    notification_id: str, who: Principal = Depends(principal), db: Database = Depends(database)
):
    """A PENDING or FAILED message becomes CANCELLED and is never sent (seed 004 §1, ``annulee``); a
    ``NotificationCancelled`` event is appended on the ``notifications`` topic. Staff only. 409
    ``INVALID_STATE`` when it is SENDING, already sent or already ended; 404 ``NOTIFICATION_NOT_FOUND``."""
    who.require_staff()
    return await admin.cancel_one(db, notification_id, by=who.key_id)


class ReplayIn(StrictModel):
    since: UtcDateTime = Field(description="Every message that failed at or after this time (UTC)")
    permanent_only: bool = False


@router.post("/notifications/replay", summary="Queue again every message that failed since T")
async def replay_notifications(
    body: ReplayIn, who: Principal = Depends(principal), db: Database = Depends(database)
):
    who.require_staff()
    return {"requeued": await admin.replay(db, body.since, permanent_only=body.permanent_only)}


@router.get("/notifications/health", summary="Outbox and channel health")
async def notifications_health(
    request: Request, who: Principal = Depends(principal), db: Database = Depends(database)
):
    who.require_staff()
    return await admin.health(db, request.app.state.services.delivery.breakers)


class CategoryLatency(BaseModel):
    """Written → sent (``sent_at − created_at``) of one category's sent rows, in seconds."""

    sent: int = Field(description="Rows SENT / DELIVERED / READ")
    p50: float | None
    p99: float | None
    max: float | None


class NotificationSummary(BaseModel):
    """The outbox since ``since``: every count is over rows written at or after it (UTC)."""

    since: datetime
    at: datetime = Field(description="When the summary was read (server clock, UTC)")
    by_category: dict[str, dict[str, int]] = Field(description="category → status → rows")
    latency_s: dict[str, CategoryLatency] = Field(description="category → written → sent, seconds")
    open: int = Field(description="Rows PENDING / SENDING / FAILED")
    open_past_expiry: int = Field(description="Rows PENDING / FAILED whose expires_at has passed")
    must_deliver_unsent: dict[str, int] = Field(
        description="Customer and admin categories → rows not SENT / DELIVERED / READ / CANCELLED (n > 0)"
    )


@router.get(
    "/notifications/summary",
    response_model=NotificationSummary,
    summary="Outbox summary: by category and state, written → sent latency, messages never sent",
)
async def notifications_summary(
    since: Annotated[
        UtcDateTime | None,
        Query(description="ISO 8601 with an offset (e.g. 2026-05-04T18:00:00Z); default: one hour ago"),
    ] = None,
    who: Principal = Depends(principal),
    db: Database = Depends(database),
):
    """What the outbox did with the messages written since ``since`` (staff only): counts by category
    and status, written → sent p50 / p99 / max by category (seconds), rows still open, open rows past
    their expiry, and customer / admin messages not sent (see :mod:`dispatchd.notifications.report`)."""
    who.require_staff()
    return await report.outbox_summary(db, since)
