"""Health grades shared by every component of ``/v1/health`` and ``/ready`` (seed 000 "Health checks").

Each component is HEALTHY, WARNING or CRITICAL; the report's ``overall`` is the worst of them. The
core grades the database and the sweeper; each domain grades itself (``Domain.health``).
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Any

from dispatchd.config import Settings
from dispatchd.core.db import Database
from dispatchd.core.sweeper import Sweeper


class Level(IntEnum):
    HEALTHY = 0
    WARNING = 1
    CRITICAL = 2


def grade(value: float | None, warning: float, critical: float) -> Level:
    """HEALTHY below ``warning`` (or unknown), WARNING below ``critical``, else CRITICAL."""
    if value is None or value < warning:
        return Level.HEALTHY
    return Level.WARNING if value < critical else Level.CRITICAL


async def database_state(db: Database) -> dict[str, Any]:
    """``{"status", "dialect", "latency_ms"}``, or ``{"status": CRITICAL, "error"}`` when unreachable."""
    started = time.perf_counter()
    try:
        await db.ping()
    except Exception as exc:  # unreachable database: report it, do not raise
        return {"status": Level.CRITICAL, "dialect": db.dialect, "error": type(exc).__name__}
    return {
        "status": Level.HEALTHY,
        "dialect": db.dialect,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


async def sweeper_state(sweeper: Sweeper, settings: Settings) -> tuple[Level, dict[str, Any]]:
    """Alive (ticked within 10 intervals, at least 5 s) and not lagging behind due deadlines."""
    since = sweeper.seconds_since_tick()
    lag = await sweeper.lag_s()
    alive = since is not None and since <= max(5.0, 10 * sweeper.interval_s)
    level = grade(lag, settings.sweeper_lag_warning_s, settings.sweeper_lag_critical_s)
    if not alive:
        level = Level.CRITICAL
    return level, {
        "alive": alive,
        "seconds_since_tick": None if since is None else round(since, 3),
        "lag_s": round(lag, 3),
        "last_error": sweeper.last_error,
    }
