"""The realtime domain (seed 002) as the app assembles it: the hub woken by every commit that wrote
events (and by other instances), stream tokens, the SSE and WebSocket routes, and agents' presence
carried by their streams."""

from __future__ import annotations

import asyncio

from dispatchd.core.health import Level
from dispatchd.core.wiring import Context, Domain, HealthContribution
from dispatchd.realtime import router
from dispatchd.realtime.hub import Hub
from dispatchd.realtime.service import AgentPresence, Realtime
from dispatchd.realtime.tokens import StreamTokens
from dispatchd.realtime.wakeups import PostgresListener, RedisWakeups


def build(context: Context) -> Domain:
    settings, db = context.settings, context.db
    hub = Hub(
        db,
        queue_max=settings.stream_queue_max,
        fallback_read_s=settings.stream_fallback_read_s,
        revocation_check_s=settings.auth_cache_s,
        ping_s=settings.stream_ping_s,
    )
    on_commit = [hub.on_commit]
    redis = None
    if db.is_postgres:
        hub.add_wakeup_source(lambda wake: PostgresListener.start(settings.database_url, wake))
    if settings.stream_redis_url:
        redis = RedisWakeups(settings.stream_redis_url)
        hub.add_wakeup_source(redis.start)
        on_commit.append(redis.on_commit)
    presence = AgentPresence(
        lambda: context.services["dispatcher"],
        grace_s=settings.agent_disconnect_grace_s,
        presence_timeout_s=settings.agent_presence_timeout_s,
    )
    realtime = Realtime(
        db,
        hub,
        StreamTokens(db, ttl_s=settings.stream_token_ttl_s, secret=settings.stream_token_secret),
        presence,
        max_per_key=settings.stream_max_per_key,
        ping_s=settings.stream_ping_s,
        retry_ms=settings.stream_retry_ms,
    )

    async def close() -> None:
        await hub.stop()
        if redis is not None:
            await redis.close()  # its publishing side, used even where no stream was opened

    async def run_hub(stop: asyncio.Event) -> None:
        await hub.start()  # else it starts with the first stream
        await stop.wait()

    async def health() -> HealthContribution:
        streams = sum(1 for _ in hub.subscriptions())
        return {"status": Level.HEALTHY, "streams": streams, "position": hub.position}, {}

    domain = Domain(
        name="realtime",
        service=realtime,
        routers=(router.router,),
        openapi_tags=(
            {
                "name": "realtime",
                "description": "Server-sent events and WebSocket of the event log (seed 002)",
            },
        ),
        background={"realtime_hub": run_hub, "agent_stream_presence": presence.run},
        on_commit=tuple(on_commit),
        extras={"hub": hub, "presence": presence},
        close=close,
    )
    return domain
