"""Waking the hubs of other instances when a commit wrote events.

* PostgreSQL: each transaction that writes events runs ``NOTIFY dispatchd_events`` (sent at commit,
  once, never on rollback: :func:`dispatchd.core.events.flush`); every hub ``LISTEN``\\s on its own
  connection (asyncpg's ``add_listener``) and reconnects when that connection drops.
* Redis pub/sub, optional (``DISPATCHD_STREAM_REDIS_URL``), for users who run it already: each commit
  that wrote events publishes on ``dispatchd:events``; every hub subscribes.

A notification carries no event: it only wakes the tail task, which reads the log. So a lost
notification delays events by at most the fallback read (1 s), and never loses one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from sqlalchemy.engine import make_url

from dispatchd.core.events import NOTIFY_CHANNEL
from dispatchd.core.logging import get_logger

log = get_logger("dispatchd.realtime")

REDIS_CHANNEL = "dispatchd:events"
_RECONNECT_S = 2.0


class PostgresListener:
    """``LISTEN dispatchd_events`` on a dedicated connection, calling ``wake()`` on each notification."""

    def __init__(self, database_url: str, wake: Callable[[], None]) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._wake = wake
        self._connection = None
        self._task: asyncio.Task | None = None
        self._lost = asyncio.Event()

    @classmethod
    async def start(cls, database_url: str, wake: Callable[[], None]) -> PostgresListener:
        listener = cls(database_url, wake)
        await listener._connect()
        listener._task = asyncio.create_task(listener._supervise(), name="realtime_pg_listen")
        return listener

    async def _connect(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(self._dsn)
        await connection.add_listener(NOTIFY_CHANNEL, lambda *_: self._wake())
        connection.add_termination_listener(lambda *_: self._lost.set())
        self._connection = connection
        self._lost.clear()
        self._wake()  # read once: a commit may have landed while we were not listening

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("realtime LISTEN connection lost; reconnecting")
            while True:
                await asyncio.sleep(_RECONNECT_S)
                try:
                    await self._connect()
                    break
                except Exception as exc:
                    log.warning("realtime LISTEN reconnect failed", error=str(exc))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()


class RedisWakeups:
    """Publishes a wake-up per commit that wrote events, and wakes the hub on each one received."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as redis
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                "DISPATCHD_STREAM_REDIS_URL needs the redis package: pip install redis"
            ) from exc
        self._client = redis.from_url(url)
        self._pubsub = None
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    def on_commit(self, info: dict) -> None:
        if not info.get("events_written"):
            return
        with contextlib.suppress(RuntimeError):  # no running loop (a synchronous CLI commit)
            task = asyncio.get_running_loop().create_task(self._publish())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _publish(self) -> None:
        try:
            await self._client.publish(REDIS_CHANNEL, b"")
        except Exception as exc:  # the others' fallback read still finds the events
            log.warning("realtime Redis publish failed", error=str(exc))

    async def start(self, wake: Callable[[], None]) -> RedisWakeups:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(REDIS_CHANNEL)
        self._task = asyncio.create_task(self._listen(wake), name="realtime_redis_listen")
        return self

    async def _listen(self, wake: Callable[[], None]) -> None:
        while True:
            try:
                async for _ in self._pubsub.listen():
                    wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("realtime Redis subscription lost; resubscribing", error=str(exc))
                await asyncio.sleep(_RECONNECT_S)
                with contextlib.suppress(Exception):
                    await self._pubsub.subscribe(REDIS_CHANNEL)

    async def close(self) -> None:
        """Idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await self._pubsub.aclose()
                self._pubsub = None
            await self._client.aclose()
