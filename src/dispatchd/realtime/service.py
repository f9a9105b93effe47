"""What both transports share: who may stream what, the per-key connection limit, the gauges, and
agents' presence carried by their streams.

An agent is ONLINE while one of its streams (SSE or WebSocket) is open in some instance: the first
stream of an OFFLINE agent connects it (seed 001 §6.2, pending conversations distributed); while
streams are open the instance heartbeats the agent every ``min(grace, presence timeout) / 3``; when its
last stream in this instance closes, its heartbeat is back-dated so that the dispatcher's
``agent_presence`` deadline disconnects it ``DISPATCHD_AGENT_DISCONNECT_GRACE_S`` later (seed 001
§6.3, conversations handed on) unless a stream (here or in another instance) heartbeats it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy import select

from dispatchd.core.auth import ApiKey, Principal
from dispatchd.core.db import Database
from dispatchd.core.errors import DispatchdError, Forbidden, Unauthorized
from dispatchd.core.logging import get_logger
from dispatchd.realtime import metrics
from dispatchd.realtime.hub import Hub
from dispatchd.realtime.tokens import StreamTokens

log = get_logger("dispatchd.realtime")


class TooManyStreams(DispatchdError):
    status = 429
    code = "TOO_MANY_STREAMS"
    title = "Too many streams"


class AgentPresence:
    """Agents' presence carried by their open streams in this process (see the module doc)."""

    def __init__(self, dispatcher: Callable[[], Any], *, grace_s: float, presence_timeout_s: float) -> None:
        self._dispatcher = dispatcher
        self.grace_s = grace_s
        self.beat_s = min(grace_s, presence_timeout_s) / 3
        self.streams: Counter[str] = Counter()

    async def opened(self, agent_id: str) -> None:
        self.streams[agent_id] += 1
        if self.streams[agent_id] == 1:
            await self._dispatcher().stream_opened(agent_id)

    async def closed(self, agent_id: str) -> None:
        self.streams[agent_id] -= 1
        if self.streams[agent_id] <= 0:
            del self.streams[agent_id]
            await self._dispatcher().stream_lost(agent_id, self.grace_s)

    async def beat(self) -> int:
        """Heartbeat every agent with an open stream here; returns how many were heartbeated."""
        return await self._dispatcher().streams_alive(sorted(self.streams))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.beat_s)
            if stop.is_set():
                return
            try:
                await self.beat()
            except Exception as exc:  # the database is away: the next beat retries
                log.warning("agent stream heartbeat failed", error=str(exc))


class Realtime:
    """The hub, the stream tokens and presence of one process."""

    def __init__(
        self,
        db: Database,
        hub: Hub,
        tokens: StreamTokens,
        presence: AgentPresence,
        *,
        max_per_key: int,
        ping_s: float,
        retry_ms: int,
    ) -> None:
        self.db = db
        self.hub = hub
        self.tokens = tokens
        self.presence = presence
        self.max_per_key = max_per_key
        self.ping_s = ping_s
        self.retry_ms = retry_ms

    def topics_for(self, who: Principal, requested: list[str], bound: list[str] | None = None) -> list[str]:
        """The topics to stream for ``requested`` (``[]``: all this principal may read, everything for
        staff). ``bound`` are a stream token's topics: then ``requested`` must be among them (a staff
        token bound to ``[]`` allows anything). Raises :class:`Forbidden` naming the first refused
        topic, :class:`~dispatchd.core.errors.InvalidInput` for a malformed one."""
        if bound is not None and bound:
            if not requested:
                requested = list(bound)
            for name in requested:
                if name not in bound:
                    raise Forbidden(f"this stream token is not bound to topic {name!r}")
        return who.readable(requested)

    async def require_active(self, who: Principal) -> None:
        """Raise :class:`Unauthorized` when the key behind a stream token was revoked (or deleted)."""
        async with self.db.read() as session:
            revoked_at = await session.execute(select(ApiKey.revoked_at).where(ApiKey.id == who.key_id))
            row = revoked_at.first()
        if row is None or row[0] is not None:
            raise Unauthorized("the API key of this stream token was revoked", code="KEY_REVOKED")

    def check_room(self, who: Principal) -> None:
        """Raise :class:`TooManyStreams` (429) when ``who`` has ``DISPATCHD_STREAM_MAX_PER_KEY`` streams
        open in this process."""
        if self.hub.open_streams(who.key_id) >= self.max_per_key:
            raise TooManyStreams(
                f"this key has {self.max_per_key} streams open in this instance already "
                "(DISPATCHD_STREAM_MAX_PER_KEY); close one, or share one stream between tabs",
                headers={"Retry-After": "5"},
            )

    @contextlib.asynccontextmanager
    async def connection(
        self, who: Principal, transport: str, on_revoked: Callable[[], None] | None = None
    ) -> AsyncIterator[None]:
        """Count one open stream of ``who`` (refused with :class:`TooManyStreams` beyond
        ``DISPATCHD_STREAM_MAX_PER_KEY``), and carry an agent's presence while it is open.
        ``on_revoked`` is called if its key is revoked meanwhile."""
        self.check_room(who)
        await self.hub.start()  # its tail also checks revocations, subscription or not
        self.hub.connected(who, on_revoked)
        gauge = metrics.CONNECTIONS.labels(transport)
        gauge.inc()
        agent_id = who.agent_id
        try:
            if agent_id is not None:
                await self.presence.opened(agent_id)
            yield
        finally:
            gauge.dec()
            self.hub.disconnected(who, on_revoked)
            if agent_id is not None:
                try:
                    await asyncio.shield(self.presence.closed(agent_id))
                except Exception as exc:  # the presence deadline still lapses without heartbeats
                    log.warning("agent stream close not recorded", agent_id=agent_id, error=str(exc))
