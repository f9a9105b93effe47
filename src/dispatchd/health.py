"""Seed 000 "Health checks": database, notification channel, sweeper (timeouts) and matching.

Each component is HEALTHY, WARNING or CRITICAL; ``overall`` is the worst of them.
Thresholds: sweeper lag (s) per settings; outbox oldest waiting message 60 s WARNING / 300 s CRITICAL;
matching timeout rate over the last hour (at least 5 finished searches) 20 % WARNING / 50 % CRITICAL.
"""

from __future__ import annotations

import time
from datetime import timedelta
from enum import IntEnum
from typing import Any

from sqlalchemy import func, select

from dispatchd.config import Settings
from dispatchd.core.db import Database
from dispatchd.core.sweeper import Sweeper
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus, FinalStatus, MatchingMetrics
from dispatchd.notifications import admin as notifications_admin
from dispatchd.notifications.delivery import DeliveryWorker


class Level(IntEnum):
    HEALTHY = 0
    WARNING = 1
    CRITICAL = 2


def _grade(value: float | None, warning: float, critical: float) -> Level:
    if value is None or value < warning:
        return Level.HEALTHY
    return Level.WARNING if value < critical else Level.CRITICAL


async def sweeper_state(sweeper: Sweeper, settings: Settings) -> tuple[Level, dict[str, Any]]:
    """Alive (ticked within 10 intervals, at least 5 s) and not lagging behind due deadlines."""
    since = sweeper.seconds_since_tick()
    lag = await sweeper.lag_s()
    alive = since is not None and since <= max(5.0, 10 * sweeper.interval_s)
    level = _grade(lag, settings.sweeper_lag_warning_s, settings.sweeper_lag_critical_s)
    if not alive:
        level = Level.CRITICAL
    return level, {
        "alive": alive,
        "seconds_since_tick": None if since is None else round(since, 3),
        "lag_s": round(lag, 3),
        "last_error": sweeper.last_error,
    }


async def health_report(
    db: Database, sweeper: Sweeper, delivery: DeliveryWorker, settings: Settings
) -> dict[str, Any]:
    """The seed's HealthStatus: ``{"overall", "components": {name: {"status", …}}, "metrics": {…}}``."""
    components: dict[str, dict[str, Any]] = {}

    started = time.perf_counter()
    try:
        await db.ping()
        components["database"] = {
            "status": Level.HEALTHY,
            "dialect": db.dialect,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        }
    except Exception as exc:  # unreachable database: report it, do not raise
        components["database"] = {
            "status": Level.CRITICAL,
            "dialect": db.dialect,
            "error": type(exc).__name__,
        }
        return _finish(components, {})

    outbox = await notifications_admin.backlog(db)
    now = db.clock.now()
    oldest_age = (now - outbox.oldest).total_seconds() if outbox.oldest else None
    # Graded on what must reach people in seconds (customers, admins): driver offers expire by design.
    must = outbox.oldest_must_deliver
    must_age = (now - must).total_seconds() if must else None
    bound = settings.notification_latency_alert_s
    components["notifications"] = {
        "status": _grade(must_age, bound, 5 * bound),
        "channel": delivery.channel.name,
        "backlog": outbox.open,
        "oldest_waiting_s": None if oldest_age is None else round(oldest_age, 3),
        "oldest_customer_or_admin_due_s": None if must_age is None else round(must_age, 3),
        "held_by_pacing": outbox.held_by_pacing,
    }

    level, state = await sweeper_state(sweeper, settings)
    components["sweeper"] = {"status": level, **state}

    hour_ago = now - timedelta(hours=1)
    async with db.read() as session:
        active = await session.scalar(
            select(func.count()).select_from(Booking).where(Booking.status == BookingStatus.SEARCHING.value)
        )
        finals = dict(
            (
                await session.execute(
                    select(MatchingMetrics.final_status, func.count())
                    .where(MatchingMetrics.created_at >= hour_ago, MatchingMetrics.final_status.is_not(None))
                    .group_by(MatchingMetrics.final_status)
                )
            ).all()
        )
        mean_response_ms = await session.scalar(
            select(func.avg(BookingOffer.response_time_ms)).where(BookingOffer.responded_at >= hour_ago)
        )
    finished = sum(finals.values())
    timeout_rate = finals.get(FinalStatus.TIMEOUT.value, 0) / finished if finished else None
    components["matching"] = {
        "status": _grade(timeout_rate if finished >= 5 else None, 0.2, 0.5),
        "active_matchings": int(active or 0),
        "finished_last_hour": finished,
        "timeout_rate_last_hour": None if timeout_rate is None else round(timeout_rate, 4),
    }
    return _finish(
        components,
        {
            "active_matchings": int(active or 0),
            "avg_response_time_s": None
            if mean_response_ms is None
            else round(float(mean_response_ms) / 1000, 3),
            "error_rate": None if timeout_rate is None else round(timeout_rate, 4),
        },
    )


def _finish(components: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    overall = max(component["status"] for component in components.values())
    for component in components.values():
        component["status"] = component["status"].name
    return {"overall": Level(overall).name, "components": components, "metrics": metrics}
