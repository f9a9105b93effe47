"""The realtime routes: ``GET /v1/stream`` (SSE), ``POST /v1/stream-tokens``, and ``/v1/ws``
(:mod:`dispatchd.realtime.ws`). No logic beyond the protocol: who may read what is
:meth:`Realtime.topics_for`, the fan-out is :mod:`dispatchd.realtime.hub`."""

from __future__ import annotations

import json
import time
from datetime import datetime

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from dispatchd.core.auth import Principal
from dispatchd.core.errors import InvalidInput, Unauthorized
from dispatchd.core.schemas import StrictModel
from dispatchd.deps import _bearer, principal
from dispatchd.realtime import metrics, ws
from dispatchd.realtime.hub import PING, StreamClosed, Subscription
from dispatchd.realtime.service import Realtime

router = APIRouter(prefix="/v1", tags=["realtime"])
router.add_api_websocket_route("/ws", ws.endpoint)

PING_FRAME = b": ping\n\n"
#: the largest ``Last-Event-ID`` / ``after`` taken (JavaScript's safe integer)
MAX_EVENT_ID = 2**53


async def realtime(request: Request) -> Realtime:
    return request.app.state.services.domain("realtime").service


class StreamTokenIn(StrictModel):
    topics: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Topics the token may stream (each checked as for `GET /v1/events`); none: all "
        "this key may read",
        examples=[["driver:drv_1"]],
    )


class StreamTokenOut(BaseModel):
    token: str = Field(description="Pass as `?token=` to `GET /v1/stream`, or in the first WebSocket message")
    expires_at: datetime = Field(description="The token is refused for new connections after this (UTC)")
    topics: list[str]


@router.post(
    "/stream-tokens",
    response_model=StreamTokenOut,
    status_code=201,
    summary="A short-lived token for a browser's stream",
)
async def create_stream_token(
    body: StreamTokenIn, who: Principal = Depends(principal), rt: Realtime = Depends(realtime)
):
    """``EventSource`` cannot send ``Authorization``: exchange the key (held by your back-end or a
    signed-in session) for a token bound to this key and these topics, accepted for
    ``DISPATCHD_STREAM_TOKEN_TTL_S`` (60 s) to connect. Raises 403 FORBIDDEN for a topic the key may not
    read."""
    topics = rt.topics_for(who, list(dict.fromkeys(body.topics)))
    token, expires_at = await rt.tokens.issue(who, topics)
    return StreamTokenOut(token=token, expires_at=expires_at, topics=topics)


async def stream_principal(
    request: Request,
    token: str | None = Query(None, max_length=4096, description="A stream token, instead of Authorization"),
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> tuple[Principal, list[str] | None]:
    """The caller and, for a stream token, the topics it is bound to."""
    rt = await realtime(request)
    if token is not None:
        claims = await rt.tokens.verify(token)
        await rt.require_active(claims.principal)
        return claims.principal, claims.topics
    if credentials is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>', or a stream token as ?token=")
    return await principal(request, credentials), None


def resume_from(last_event_id: str | None, after: int | None) -> int | None:
    """``Last-Event-ID`` (sent by a reconnecting ``EventSource``) wins over ``?after=``; None: from now."""
    if last_event_id is not None and last_event_id.strip():
        try:
            value = int(last_event_id.strip())
        except ValueError as exc:
            raise InvalidInput("Last-Event-ID must be an event id (an integer)") from exc
        if not 0 <= value <= MAX_EVENT_ID:
            raise InvalidInput(f"Last-Event-ID must be between 0 and {MAX_EVENT_ID}")
        return value
    return after


@router.get(
    "/stream",
    summary="Server-sent events of the topics this key may read, resumable",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "An endless SSE stream"}},
)
async def stream(
    request: Request,
    topic: list[str] = Query(
        [], max_length=100, description="Topics (repeatable); staff may use patterns such as `booking:*`"
    ),
    after: int | None = Query(None, ge=0, le=MAX_EVENT_ID, description="Resume after this event id"),
    last_event_id: str | None = Header(None, max_length=32, description="Resume after this id (wins)"),
    caller: tuple[Principal, list[str] | None] = Depends(stream_principal),
    rt: Realtime = Depends(realtime),
):
    """Each frame: ``id:`` the event id, ``event:`` its type, ``data:`` the event as JSON
    (``{"id", "topic", "type", "data", "created_at"}``). With ``Last-Event-ID`` (or ``after``) the stream
    first replays every event of these topics after it from the log, then continues live: nothing is
    missed or repeated. A comment ping every ``DISPATCHD_STREAM_PING_S``; a ``retry:`` hint first. When
    the server ends the stream (a slow consumer, a revoked key, a shutdown) it sends ``event: close``
    with ``{"code", "reason"}``; reconnect with ``Last-Event-ID`` to resume.

    Errors: 401 UNAUTHORIZED / STREAM_TOKEN_INVALID / STREAM_TOKEN_EXPIRED / KEY_REVOKED, 403 FORBIDDEN
    (a topic this key may not read), 422 VALIDATION_ERROR, 429 TOO_MANY_STREAMS.
    """
    who, bound = caller
    topics = rt.topics_for(who, list(dict.fromkeys(topic)), bound)
    start = resume_from(last_event_id, after)
    rt.check_room(who)  # before the 200: the generator below counts the stream once it runs
    subscription = rt.hub.subscription(who, topics, "sse")
    subscription.pings = True  # the hub's keep-alives, instead of a ping task per connection
    return EventSourceResponse(_frames(rt, subscription, start), ping=0, sep="\n", send_timeout=30)


async def _frames(rt: Realtime, subscription: Subscription, start: int | None):
    pushed = metrics.EVENTS_PUSHED.labels("sse")
    latency = metrics.PUSH_LATENCY.labels("sse")
    async with rt.connection(subscription.principal, "sse"):
        try:
            yield ServerSentEvent(retry=rt.retry_ms, sep="\n")
            async for event in subscription.events(start):
                if event is PING:
                    yield PING_FRAME
                    continue
                yield event.sse()
                pushed.inc()
                if not event.replayed:
                    latency.observe(max(0.0, time.time() - event.created_ts))
        except StreamClosed as closed:
            close = {"code": closed.code, "reason": closed.reason}
            yield ServerSentEvent(event="close", data=json.dumps(close), sep="\n")
        finally:
            subscription.hub.unregister(subscription)
