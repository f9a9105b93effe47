"""One hub per process: a single tail task reads the event log and fans events out to the streams.

DESIGN.md "Realtime hub". No connection ever polls the database:

* the **tail task** reads ``id > last_id`` in pages, oldest first, and hands each event to the
  subscriptions of its topic (and to those with a matching pattern), in id order. It is woken by the
  commits of this process (:meth:`Hub.wake`, an ``after_commit`` hook), by other instances
  (PostgreSQL ``LISTEN/NOTIFY``, optionally Redis pub/sub: :mod:`dispatchd.realtime.wakeups`), and
  reads at least every ``DISPATCHD_STREAM_FALLBACK_READ_S`` (1 s) in case a wake-up was missed;
* the event log's ids follow commit order (:mod:`dispatchd.core.events`), so reading ``id > last_id``
  never skips an event that commits late: the fan-out has no gap;
* a **subscription** that resumes (``after``) first reads what it missed from the log, page by page, up
  to the hub's position, then joins the live fan-out in the same step of the event loop, so it gets
  every event once, in order (:meth:`Subscription.events`);
* a **slow consumer** has a bounded queue (``DISPATCHD_STREAM_QUEUE_MAX``); on overflow it is closed
  with a reason, never silently thinned, and resumes from its last id.

The frame of an event (its SSE bytes and its WebSocket JSON) is encoded once per event, not once per
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from dispatchd.core import events, topics
from dispatchd.core.auth import ApiKey, Principal
from dispatchd.core.db import Database
from dispatchd.core.events import EventRecord
from dispatchd.core.logging import get_logger
from dispatchd.realtime import metrics

log = get_logger("dispatchd.realtime")

#: events read from the log per query, by the tail task and by a resuming subscription
PAGE = 500


class CloseCode:
    """Why the server ended a stream (the ``code`` of the final ``close`` frame)."""

    SLOW_CONSUMER = "SLOW_CONSUMER"
    KEY_REVOKED = "KEY_REVOKED"
    SHUTDOWN = "SHUTDOWN"


class StreamClosed(Exception):
    """The hub ended this stream: ``code`` (:class:`CloseCode`) and a ``reason`` for the client."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Published:
    """An event as the hub hands it out, with its frames encoded once, on first use."""

    record: EventRecord
    _sse: bytes | None = None
    _json: str | None = None
    _created_ts: float | None = None
    #: read from the log for a resuming stream, not pushed live (its latency is not the hub's)
    replayed: bool = False

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def created_ts(self) -> float:
        """``created_at`` as a POSIX timestamp (s)."""
        if self._created_ts is None:
            self._created_ts = self.record.created_at.timestamp()
        return self._created_ts

    def payload(self) -> str:
        """``{"id", "topic", "type", "data", "created_at"}`` as JSON: the SSE ``data:`` and the
        WebSocket message."""
        if self._json is None:
            self._json = json.dumps(self.record.as_dict(), separators=(",", ":"), ensure_ascii=False)
        return self._json

    def sse(self) -> bytes:
        """The SSE frame (WHATWG HTML §9.2 "Server-sent events"): ``id:``, ``event:``, ``data:``."""
        if self._sse is None:
            self._sse = (
                f"id: {self.record.id}\nevent: {self.record.type}\ndata: {self.payload()}\n\n".encode()
            )
        return self._sse


_CLOSE = object()


class _Ping:
    """Put in a queue every ``ping_s`` by the hub: the SSE stream writes a comment line (a keep-alive
    for proxies), so no connection needs a timer of its own."""

    id = 0


PING = _Ping()


@dataclass(eq=False)
class Subscription:
    """One stream's interest: exact topics and patterns (``booking:*``; ``[]`` with ``everything``)."""

    hub: Hub
    principal: Principal
    transport: str
    exact: set[str] = field(default_factory=set)
    patterns: list[str] = field(default_factory=list)
    everything: bool = False
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: StreamClosed | None = None
    #: the last event id this subscription has handed out (or replayed up to)
    cursor: int = 0
    registered: bool = False
    #: whether the hub's keep-alive :data:`PING` is wanted in the queue (SSE)
    pings: bool = False

    def wants(self, topic: str) -> bool:
        return self.everything or topic in self.exact or any(topics.matches(p, topic) for p in self.patterns)

    @property
    def topic_filter(self) -> list[str] | None:
        return None if self.everything else [*self.exact, *self.patterns]

    def offer(self, event: Published) -> None:
        """Queue ``event`` for this stream; a full queue closes it (the client resumes from its id)."""
        if self.closed is not None:
            return
        if self.queue.qsize() >= self.hub.queue_max:
            metrics.SLOW_CONSUMERS_CLOSED.labels(self.transport).inc()
            self.close(
                CloseCode.SLOW_CONSUMER,
                f"more than {self.hub.queue_max} events waited for this stream; reconnect with "
                "Last-Event-ID to resume",
            )
            return
        self.queue.put_nowait(event)

    def close(self, code: str, reason: str) -> None:
        """End the stream: what is queued is dropped (the client resumes it from the log)."""
        if self.closed is not None:
            return
        self.closed = StreamClosed(code, reason)
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_CLOSE)
        self.hub.unregister(self)

    async def events(self, after: int | None) -> AsyncIterator[Published]:
        """Every event of this subscription after ``after`` (None: from now), in id order, each once:
        first those read from the log, then the live ones; and :data:`PING` when :attr:`pings` is set.
        Raises :class:`StreamClosed` when the hub ends the stream."""
        await self.hub.start()
        if after is None:
            self.cursor = self.hub.position
            self.hub.register(self)
        else:
            self.cursor = after
            metrics.RESUMES.labels(self.transport).inc()
            async for event in self._catch_up():
                yield event
        while True:
            item = await self.queue.get()
            if item is _CLOSE:
                assert self.closed is not None
                raise self.closed
            if item is PING:
                yield item
                continue
            if item.id <= self.cursor:
                continue
            self.cursor = item.id
            yield item

    async def _catch_up(self) -> AsyncIterator[Published]:
        # Read (cursor, head] from the log; join the fan-out only in the same step of the event loop in
        # which the hub is still at ``head``: every later event then reaches the queue, none twice.
        while True:
            head = self.hub.position
            while True:
                async with self.hub.db.read() as session:
                    page = await events.read(
                        session, after_id=self.cursor, topics=self.topic_filter, limit=PAGE, up_to=head
                    )
                for record in page:
                    self.cursor = record.id
                    yield Published(record, replayed=True)
                if len(page) < PAGE:
                    break
            self.cursor = max(self.cursor, head)
            if self.hub.position == head:
                self.hub.register(self)
                return


class Hub:
    """The process's fan-out of the event log to its open streams (see the module doc)."""

    def __init__(
        self,
        db: Database,
        *,
        queue_max: int = 1000,
        fallback_read_s: float = 1.0,
        revocation_check_s: float = 5.0,
        ping_s: float = 15.0,
    ) -> None:
        self.db = db
        self.ping_s = ping_s
        self.queue_max = queue_max
        self.fallback_read_s = fallback_read_s
        self.revocation_check_s = max(revocation_check_s, 0.5)
        #: the id of the last event fanned out (or the log's head when the hub started)
        self.position = 0
        self._exact: dict[str, set[Subscription]] = defaultdict(set)
        self._wide: set[Subscription] = set()
        self._per_key: dict[str, int] = defaultdict(int)
        #: key id → what ends each of its open connections on revocation (a WebSocket with no
        #: subscription has nothing else the hub could close)
        self._on_revoked: dict[str, list[Callable[[], None]]] = defaultdict(list)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._started: asyncio.Future | None = None
        self._wakeup_sources: list[Callable[[Callable[[], None]], Any]] = []
        self._closers: list[Any] = []
        self._stopping = False

    # ---------------------------------------------------------------------------------- life

    def add_wakeup_source(self, start: Callable[[Callable[[], None]], Any]) -> None:
        """``start(wake)`` is awaited when the hub starts; it returns an object with ``async close()``.
        Used for PostgreSQL LISTEN and Redis pub/sub."""
        self._wakeup_sources.append(start)

    async def start(self) -> None:
        """Start the tail task on first use (idempotent; concurrent callers wait for the first)."""
        if self._started is not None:
            await asyncio.shield(self._started)
            return
        self._started = asyncio.get_running_loop().create_future()
        try:
            async with self.db.read() as session:
                self.position = await events.last_id(session)
            for source in self._wakeup_sources:
                try:
                    self._closers.append(await source(self.wake))
                except Exception as exc:  # the fallback read still delivers, only later
                    log.warning("realtime wake-up source unavailable", error=str(exc))
            self._task = asyncio.create_task(self._run(), name="realtime_hub")
            self._started.set_result(None)
        except BaseException as exc:
            self._started.set_exception(exc)
            self._started.exception()  # retrieved: the caller re-raises it
            self._started = None
            raise

    async def stop(self) -> None:
        """Close every stream (code SHUTDOWN) and stop the tail task."""
        self._stopping = True
        for subscription in list(self.subscriptions()):
            subscription.close(CloseCode.SHUTDOWN, "the server is shutting down; reconnect to resume")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for closer in self._closers:
            with contextlib.suppress(Exception):
                await closer.close()

    def wake(self) -> None:
        """Ask the tail task to read now (a commit wrote events)."""
        self._wake.set()

    def on_commit(self, info: dict) -> None:
        if info.get("events_written"):
            self._wake.set()

    # ---------------------------------------------------------------------------------- streams

    def subscriptions(self) -> Iterable[Subscription]:
        seen: set[int] = set()
        for group in (*self._exact.values(), self._wide):
            for subscription in group:
                if id(subscription) not in seen:
                    seen.add(id(subscription))
                    yield subscription

    def open_streams(self, key_id: str) -> int:
        return self._per_key.get(key_id, 0)

    def connected(self, principal: Principal, on_revoked: Callable[[], None] | None = None) -> None:
        self._per_key[principal.key_id] += 1
        if on_revoked is not None:
            self._on_revoked[principal.key_id].append(on_revoked)

    def disconnected(self, principal: Principal, on_revoked: Callable[[], None] | None = None) -> None:
        self._per_key[principal.key_id] -= 1
        if self._per_key[principal.key_id] <= 0:
            del self._per_key[principal.key_id]
        callbacks = self._on_revoked.get(principal.key_id)
        if on_revoked is not None and callbacks is not None:
            if on_revoked in callbacks:
                callbacks.remove(on_revoked)
            if not callbacks:
                del self._on_revoked[principal.key_id]

    def subscription(self, principal: Principal, requested: list[str], transport: str) -> Subscription:
        """A subscription to ``requested`` (already checked by ``Principal.readable``; ``[]`` for a staff
        key means everything)."""
        subscription = Subscription(self, principal, transport)
        if not requested:
            subscription.everything = True
        for name in requested:
            if name == "*":
                subscription.everything = True
            elif topics.is_pattern(name):
                subscription.patterns.append(name)
            else:
                subscription.exact.add(name)
        return subscription

    def register(self, subscription: Subscription) -> None:
        if subscription.closed is not None or subscription.registered:
            return
        subscription.registered = True
        if subscription.everything or subscription.patterns:
            self._wide.add(subscription)
        for name in subscription.exact:
            self._exact[name].add(subscription)

    def unregister(self, subscription: Subscription) -> None:
        if not subscription.registered:
            return
        subscription.registered = False
        self._wide.discard(subscription)
        for name in subscription.exact:
            group = self._exact.get(name)
            if group is not None:
                group.discard(subscription)
                if not group:
                    del self._exact[name]

    # ---------------------------------------------------------------------------------- tail

    async def _run(self) -> None:
        next_revocation_check = time.monotonic() + self.revocation_check_s
        next_ping = time.monotonic() + self.ping_s
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(self.fallback_read_s, self.ping_s))
            self._wake.clear()
            if time.monotonic() >= next_ping:
                next_ping = time.monotonic() + self.ping_s
                self.ping()
            try:
                await self.read_new()
                if time.monotonic() >= next_revocation_check:
                    next_revocation_check = time.monotonic() + self.revocation_check_s
                    await self.close_revoked()
            except Exception as exc:  # the database is away: keep the streams, retry at the next tick
                log.warning("realtime hub could not read the event log", error=str(exc))

    def ping(self) -> None:
        """Queue a keep-alive :data:`PING` for every stream that wants one (not behind a full queue)."""
        for subscription in list(self.subscriptions()):
            if subscription.pings and subscription.closed is None and subscription.queue.qsize() < 2:
                subscription.queue.put_nowait(PING)

    async def read_new(self) -> int:
        """Read and fan out every event after :attr:`position`; returns how many. With no subscription,
        only move to the log's head: a stream that opens later catches up from the log itself."""
        if not self._exact and not self._wide:
            async with self.db.read() as session:
                head = await events.last_id(session)
            if not self._exact and not self._wide:  # again: a stream may have joined during the read
                self.position = max(self.position, head)
                return 0
        total = 0
        while True:
            async with self.db.read() as session:
                page = await events.read(session, after_id=self.position, limit=PAGE)
            if not page:
                return total
            self.fan_out(page)
            total += len(page)
            if len(page) < PAGE:
                return total

    def fan_out(self, page: list[EventRecord]) -> None:
        """Hand each event of ``page`` (in id order) to the subscriptions that want it, and move
        :attr:`position` past them, in one step of the event loop."""
        for record in page:
            published = Published(record)
            for subscription in tuple(self._exact.get(record.topic, ())):
                subscription.offer(published)
            for subscription in tuple(self._wide):
                if subscription.wants(record.topic):
                    subscription.offer(published)
            self.position = record.id
            metrics.EVENTS_READ.inc()

    async def close_revoked(self) -> int:
        """Close the streams of keys revoked since they connected; returns how many were closed."""
        key_ids = set(self._per_key)  # the keys with a stream open (no walk over every subscription)
        if not key_ids:
            return 0
        async with self.db.read() as session:
            revoked = set(
                (
                    await session.scalars(
                        select(ApiKey.id).where(ApiKey.id.in_(key_ids), ApiKey.revoked_at.is_not(None))
                    )
                ).all()
            )
        if not revoked:
            return 0
        closed = 0
        for subscription in list(self.subscriptions()):
            if subscription.principal.key_id in revoked:
                subscription.close(CloseCode.KEY_REVOKED, "the API key of this stream was revoked")
                closed += 1
        for key_id in revoked:
            for end in list(self._on_revoked.get(key_id, ())):
                end()
        return closed
