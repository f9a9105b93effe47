"""Core HTTP routes: the event log and API keys, under ``/v1``."""

from __future__ import annotations

import json
from datetime import datetime

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from dispatchd.core import auth, events
from dispatchd.core import topics as topics_module
from dispatchd.core.auth import Principal, Role
from dispatchd.core.db import Database
from dispatchd.core.errors import InvalidInput, NotFound
from dispatchd.core.events import Event
from dispatchd.core.schemas import StrictModel
from dispatchd.deps import database, principal

router = APIRouter(prefix="/v1")


class EventOut(BaseModel):
    id: int
    topic: str
    type: str
    data: dict
    created_at: datetime


class EventPage(BaseModel):
    events: list[EventOut]
    next_after: int = Field(
        description="Pass back as `after` to continue; equals `after` when nothing is new"
    )


@router.get("/events", response_model=EventPage, tags=["events"], summary="Page through the event log")
async def list_events(
    after: int = Query(0, ge=0, le=2**53, description="Return events with id > after"),
    topic: list[str] | None = Query(
        None,
        description="Only these topics (repeatable); staff may use patterns such as `booking:*`",
    ),
    limit: int = Query(100, ge=1, le=1000),
    who: Principal = Depends(principal),
    db: Database = Depends(database),
):
    """Events in id order, of the topics this key may read (:meth:`Principal.may_read`): a driver key
    reads only ``driver:<own id>``. Raises 403 FORBIDDEN for a topic the key may not read."""
    topics = who.readable(topic)
    async with db.read() as session:
        page = await events.read(session, after_id=after, topics=topics or None, limit=limit)
    return EventPage(
        events=[EventOut(**e.as_dict()) for e in page],
        next_after=page[-1].id if page else after,
    )


class EventIn(StrictModel):
    topic: str = Field(
        max_length=200, description="A topic, `kind:id` (no pattern)", examples=["shift:dakar-nord"]
    )
    type: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_.]*$", examples=["ShiftOpened"]
    )
    data: dict = Field(default_factory=dict, description="JSON object, at most 16 KB once encoded")


class EventsIn(StrictModel):
    events: list[EventIn] = Field(min_length=1, max_length=1000)


class PublishedOut(BaseModel):
    ids: list[int] = Field(description="The ids the events were given, in the order sent")


@router.post(
    "/events",
    response_model=PublishedOut,
    status_code=201,
    tags=["events"],
    summary="Publish your own events to the log and its streams",
)
async def publish_events(
    body: EventsIn, who: Principal = Depends(principal), db: Database = Depends(database)
):
    """Staff only (admin, integration): append up to 1,000 events in one transaction, pushed to every
    stream of their topics like dispatchd's own (Centrifugo calls this the server publish API). Raises
    403 FORBIDDEN for another role, 422 VALIDATION_ERROR for a pattern, a malformed topic or data over
    16 KB."""
    who.require_staff()
    for event in body.events:
        if not topics_module.is_valid(event.topic):
            raise InvalidInput(f"{event.topic!r} is not a topic (kind:id, no pattern)")
        if len(json.dumps(event.data)) > 16_384:
            raise InvalidInput("an event's data must be at most 16 KB once encoded")
    async with db.transaction() as session:
        for event in body.events:
            events.append(session, event.topic, event.type, event.data)
        await events.flush(session)
        # The event log's lock (PostgreSQL) or the single writer (SQLite) is held: the newest are ours.
        ids = await session.scalars(select(Event.id).order_by(Event.id.desc()).limit(len(body.events)))
        published = sorted(ids.all())
    return PublishedOut(ids=published)


class ApiKeyIn(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"role": "driver", "driver_id": "drv_…", "name": "Moussa's phone"}]},
    )

    role: Role = Field(
        description="`driver` and `agent` keys are bound to a subject: a `driver` key needs `driver_id` (or "
        "`subject: driver:<id>`), an `agent` key `subject: agent:<id>`; `admin` and `integration` keys take "
        "neither (422 VALIDATION_ERROR otherwise; 404 when the subject does not exist)"
    )
    driver_id: str | None = Field(
        default=None, max_length=40, description="Short for subject driver:<id>; only with role `driver`"
    )
    subject: str | None = Field(
        default=None, max_length=80, description="What a subject-bound key acts as: driver:<id>"
    )
    name: str | None = Field(default=None, max_length=200)


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    role: Role
    subject: str | None
    driver_id: str | None
    name: str | None
    created_at: datetime
    revoked_at: datetime | None = None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="Shown only in this answer; stored as a SHA-256 hash")


@router.post(
    "/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    tags=["auth"],
    summary="Create an API key",
    responses={404: {"description": "`<KIND>_NOT_FOUND`: the subject (driver_id) does not exist"}},
)
async def create_api_key(
    body: ApiKeyIn, request: Request, who: Principal = Depends(principal), db: Database = Depends(database)
):
    """Admin only. A ``driver`` key needs its driver (``driver_id`` or ``subject: driver:<id>``). Raises
    422 VALIDATION_ERROR for a missing or misplaced subject, 404 ``<KIND>_NOT_FOUND`` for an unknown
    one."""
    who.require_admin()
    services = request.app.state.services
    async with db.transaction() as session:
        row, plaintext = await auth.create_key(
            session, body.role, driver_id=body.driver_id, subject=body.subject, name=body.name
        )
        if row.subject is not None and not await services.subject_exists(session, row.subject):
            kind, _, row_id = row.subject.partition(":")
            raise NotFound(f"{kind} {row_id} not found", code=f"{kind.upper()}_NOT_FOUND")
    return ApiKeyCreated(**ApiKeyOut.model_validate(row).model_dump(), key=plaintext)


@router.get(
    "/api-keys", response_model=list[ApiKeyOut], tags=["auth"], summary="List API keys (never the keys)"
)
async def list_api_keys(who: Principal = Depends(principal), db: Database = Depends(database)):
    who.require_admin()
    async with db.read() as session:
        return await auth.list_keys(session)


@router.delete("/api-keys/{key_id}", response_model=ApiKeyOut, tags=["auth"], summary="Revoke an API key")
async def revoke_api_key(
    key_id: str, request: Request, who: Principal = Depends(principal), db: Database = Depends(database)
):
    who.require_admin()
    async with db.transaction() as session:
        revoked = await auth.revoke_key(session, key_id)
    request.app.state.services.principals.forget(key_id)
    return revoked
