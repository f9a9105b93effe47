"""``/v1/ws``: the event log over one WebSocket (RFC 6455), both ways, as small JSON messages.

Authentication: an ``Authorization: Bearer`` header (server-to-server), or, from a browser, a first
message ``{"op": "auth", "token": "<stream token>"}`` within 10 s. The server answers
``{"op": "welcome", "key_id", "role", "subject"}``.

Client → server (each may carry a ``ref`` echoed in its answer)::

    {"op": "subscribe", "topics": [...], "after": 41}   → {"op": "subscribed", "topics": [...]}
    {"op": "unsubscribe", "topics": [...]}              → {"op": "unsubscribed", "topics": [...]}
    {"op": "ping"}                                      → {"op": "pong"}
    {"op": "respond", "booking_id": "bkg_…", "type": "ACCEPT"}   (driver keys: the same service call as
        POST /v1/bookings/{id}/responses)             → {"op": "responded", "success", "action", …}
    {"op": "presence", "status": "away" | "online"}     (agent keys) → {"op": "presence", "status"}

Server → client: events as ``{"id", "topic", "type", "data", "created_at"}`` (no ``op``), in id order
per subscription, each once per connection; errors as ``{"op": "error", "code", "detail"}``; and, when
the server ends the connection, ``{"op": "close", "code", "reason"}`` then a close frame (1013 for a slow
consumer, 1008 for a revoked key, 1001 for a shutdown). Resume after a reconnect with ``subscribe``'s
``after`` = the last id received.

An agent key's connection carries its presence (:mod:`dispatchd.realtime.service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.security import HTTPAuthorizationCredentials
from starlette.websockets import WebSocketState

from dispatchd.core.auth import Principal
from dispatchd.core.errors import DispatchdError, Forbidden, InvalidInput, Unauthorized
from dispatchd.deps import principal as bearer_principal
from dispatchd.realtime import metrics
from dispatchd.realtime.hub import CloseCode, StreamClosed, Subscription

AUTH_TIMEOUT_S = 10.0
#: the largest message a client may send
MESSAGE_MAX_BYTES = 65_536
#: event ids remembered per connection, so that overlapping subscriptions send an event once
_RECENT = 4096
_CLOSE_CODES = {CloseCode.SLOW_CONSUMER: 1013, CloseCode.KEY_REVOKED: 1008, CloseCode.SHUTDOWN: 1001}


class _Connection:
    def __init__(self, websocket: WebSocket, rt, who: Principal, bound: list[str] | None) -> None:
        self.websocket = websocket
        self.rt = rt
        self.who = who
        self.bound = bound
        self.send_lock = asyncio.Lock()
        self.pumps: dict[Subscription, asyncio.Task] = {}
        self.recent: deque[int] = deque(maxlen=_RECENT)
        self.recent_set: set[int] = set()
        self.closing: StreamClosed | None = None
        self._tasks: set[asyncio.Task] = set()
        self.pushed = metrics.EVENTS_PUSHED.labels("ws")
        self.latency = metrics.PUSH_LATENCY.labels("ws")

    async def send(self, message: dict[str, Any] | str) -> None:
        text = message if isinstance(message, str) else json.dumps(message, separators=(",", ":"))
        async with self.send_lock:
            await self.websocket.send_text(text)

    async def error(self, code: str, detail: str, ref: Any = None) -> None:
        await self.send({"op": "error", "code": code, "detail": detail, "ref": ref})

    # -------------------------------------------------------------------------- subscriptions

    async def subscribe(self, message: dict[str, Any]) -> None:
        requested = message.get("topics", [])
        after = message.get("after")
        if not isinstance(requested, list) or not all(isinstance(t, str) for t in requested):
            raise InvalidInput("topics must be a list of strings")
        if len(requested) > 100:
            raise InvalidInput("at most 100 topics per subscribe")
        if after is not None and (
            not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= 2**53
        ):
            raise InvalidInput("after must be an event id (an integer ≥ 0)")
        topics = self.rt.topics_for(self.who, list(dict.fromkeys(requested)), self.bound)
        subscription = self.rt.hub.subscription(self.who, topics, "ws")
        self.pumps[subscription] = asyncio.create_task(self._pump(subscription, after))
        await self.send({"op": "subscribed", "topics": topics, "ref": message.get("ref")})

    async def unsubscribe(self, message: dict[str, Any]) -> None:
        names = message.get("topics", [])
        if not isinstance(names, list) or not all(isinstance(t, str) for t in names):
            raise InvalidInput("topics must be a list of strings")
        removed = set(names)
        for subscription, pump in list(self.pumps.items()):
            self.rt.hub.unregister(subscription)
            subscription.exact -= removed
            subscription.patterns = [p for p in subscription.patterns if p not in removed]
            if subscription.everything and "*" in removed:
                subscription.everything = False
            if subscription.exact or subscription.patterns or subscription.everything:
                self.rt.hub.register(subscription)
            else:
                pump.cancel()
                del self.pumps[subscription]
        await self.send({"op": "unsubscribed", "topics": names, "ref": message.get("ref")})

    async def _pump(self, subscription: Subscription, after: int | None) -> None:
        try:
            async for event in subscription.events(after):
                if event.id in self.recent_set:
                    continue
                if len(self.recent) == _RECENT:
                    self.recent_set.discard(self.recent[0])
                self.recent.append(event.id)
                self.recent_set.add(event.id)
                await self.send(event.payload())
                self.pushed.inc()
                if not event.replayed:
                    self.latency.observe(max(0.0, time.time() - event.created_ts))
        except StreamClosed as closed:
            self.closing = closed
            with contextlib.suppress(Exception):
                await self.send({"op": "close", "code": closed.code, "reason": closed.reason})
                await self.websocket.close(code=_CLOSE_CODES.get(closed.code, 1011), reason=closed.code)
        finally:
            self.rt.hub.unregister(subscription)

    def revoked(self) -> None:
        """The key was revoked: say so and close, even with no subscription open (called by the hub)."""
        self.closing = StreamClosed(CloseCode.KEY_REVOKED, "the API key of this connection was revoked")
        self._tasks.add(task := asyncio.create_task(self._close_revoked()))
        task.add_done_callback(self._tasks.discard)

    async def _close_revoked(self) -> None:
        with contextlib.suppress(Exception):
            await self.send({"op": "close", "code": CloseCode.KEY_REVOKED, "reason": self.closing.reason})
            await self.websocket.close(code=_CLOSE_CODES[CloseCode.KEY_REVOKED], reason=CloseCode.KEY_REVOKED)

    def stop(self) -> None:
        for subscription, pump in self.pumps.items():
            self.rt.hub.unregister(subscription)
            pump.cancel()

    # -------------------------------------------------------------------------- client actions

    async def respond(self, message: dict[str, Any]) -> None:
        driver_id = self.who.driver_id
        if driver_id is None:
            raise Forbidden("respond is for driver keys")
        booking_id, answer = message.get("booking_id"), message.get("type")
        if not isinstance(booking_id, str) or not 0 < len(booking_id) <= 40:
            raise InvalidInput("booking_id must be a booking id")
        if answer not in ("ACCEPT", "REJECT"):
            raise InvalidInput("type must be ACCEPT or REJECT")
        matching = self.websocket.app.state.services.domain("matching").service
        result = await matching.respond(booking_id, driver_id, answer)
        await self.send(
            {
                "op": "responded",
                "ref": message.get("ref"),
                "success": result.success,
                "action": result.action.value,
                "message": result.message,
                "booking_id": result.booking_id,
                "driver_id": result.driver_id,
            }
        )

    async def presence(self, message: dict[str, Any]) -> None:
        agent_id = self.who.agent_id
        if agent_id is None:
            raise Forbidden("presence is for agent keys")
        from dispatchd.dispatcher.models import Presence

        status = message.get("status")
        if status not in ("online", "away"):
            raise InvalidInput("status must be online or away")
        dispatcher = self.websocket.app.state.services.domain("dispatcher").service
        agent = await dispatcher.set_presence(agent_id, Presence(status.upper()))
        await self.send({"op": "presence", "status": agent.presence, "ref": message.get("ref")})


async def _authenticate(websocket: WebSocket, rt) -> tuple[Principal, list[str] | None]:
    header = websocket.headers.get("authorization")
    if header:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            raise Unauthorized("send 'Authorization: Bearer <key>'")
        who = await bearer_principal(
            websocket, HTTPAuthorizationCredentials(scheme="Bearer", credentials=credentials)
        )
        return who, None
    try:
        first = await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_S)
    except TimeoutError as exc:
        raise Unauthorized(f'send {{"op": "auth", "token": …}} within {AUTH_TIMEOUT_S:g} s') from exc
    message = _parse(first)
    token = message.get("token")
    if message.get("op") != "auth" or not isinstance(token, str):
        raise Unauthorized('the first message must be {"op": "auth", "token": "<stream token>"}')
    claims = await rt.tokens.verify(token)
    await rt.require_active(claims.principal)
    return claims.principal, claims.topics


def _parse(text: str) -> dict[str, Any]:
    if len(text) > MESSAGE_MAX_BYTES:
        raise InvalidInput(f"messages are at most {MESSAGE_MAX_BYTES} bytes")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput("a message must be a JSON object") from exc
    if not isinstance(message, dict):
        raise InvalidInput("a message must be a JSON object")
    return message


async def endpoint(websocket: WebSocket) -> None:
    """``/v1/ws``: see the module doc."""
    rt = websocket.app.state.services.domain("realtime").service
    await websocket.accept()
    try:
        who, bound = await _authenticate(websocket, rt)
        rt.check_room(who)
    except DispatchdError as exc:
        with contextlib.suppress(Exception):
            await websocket.send_text(json.dumps({"op": "error", "code": exc.code, "detail": exc.detail}))
            await websocket.close(code=1008 if exc.status in (401, 403) else 1013, reason=exc.code)
        return
    except WebSocketDisconnect:
        return
    connection = _Connection(websocket, rt, who, bound)
    try:
        async with rt.connection(who, "ws", connection.revoked):
            await connection.send(
                {"op": "welcome", "key_id": who.key_id, "role": who.role.value, "subject": who.subject}
            )
            await _serve(connection)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away (a RuntimeError: it did so while we were sending)
    except DispatchdError as exc:  # refused at connect (too many streams, an unknown agent)
        with contextlib.suppress(Exception):
            await connection.error(exc.code, exc.detail)
            await websocket.close(code=1008 if exc.status in (401, 403, 404) else 1013, reason=exc.code)
    finally:
        connection.stop()


async def _serve(connection: _Connection) -> None:
    websocket = connection.websocket
    handlers = {
        "subscribe": connection.subscribe,
        "unsubscribe": connection.unsubscribe,
        "respond": connection.respond,
        "presence": connection.presence,
    }
    while connection.closing is None and websocket.client_state is WebSocketState.CONNECTED:
        received = await websocket.receive()
        if received["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(received.get("code", 1000))
        ref = None
        try:
            text = received.get("text")
            if text is None:
                raise InvalidInput("send JSON text messages, not binary ones")
            message = _parse(text)
            ref = message.get("ref")
            op = message.get("op")
            if op == "ping":
                await connection.send({"op": "pong", "ref": ref})
                continue
            handler = handlers.get(op)
            if handler is None:
                raise InvalidInput(
                    f"unknown op {op!r}; use subscribe, unsubscribe, ping, respond or presence"
                )
            await handler(message)
        except DispatchdError as exc:
            await connection.error(exc.code, exc.detail, ref)
