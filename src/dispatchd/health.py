"""Seed 000 "Health checks", assembled: the database and the sweeper (core), then each domain's own
component (notifications, matching, reservations…), in assembly order.

``overall`` is the worst component. Thresholds: sweeper lag per settings; each domain documents its own
(``notifications``: oldest due customer or admin message, ``DISPATCHD_NOTIFICATION_LATENCY_ALERT_S``
WARNING / 5× CRITICAL; ``matching``: timeout rate over the last hour, 20 % / 50 %).
"""

from __future__ import annotations

from typing import Any

from dispatchd.config import Settings
from dispatchd.core.db import Database
from dispatchd.core.health import Level, database_state, sweeper_state
from dispatchd.core.sweeper import Sweeper
from dispatchd.core.wiring import Domain


async def health_report(
    db: Database, sweeper: Sweeper, domains: list[Domain], settings: Settings
) -> dict[str, Any]:
    """The seed's HealthStatus: ``{"overall", "components": {name: {"status", …}}, "metrics": {…}}``."""
    components: dict[str, dict[str, Any]] = {"database": await database_state(db)}
    if components["database"]["status"] is Level.CRITICAL:
        return _finish(components, {})
    level, state = await sweeper_state(sweeper, settings)
    components["sweeper"] = {"status": level, **state}
    summary: dict[str, Any] = {}
    for domain in domains:
        if domain.health is not None:
            component, figures = await domain.health()
            components[domain.name] = component
            summary.update(figures)
    return _finish(components, summary)


def _finish(components: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    overall = max(component["status"] for component in components.values())
    for component in components.values():
        component["status"] = component["status"].name
    return {"overall": Level(overall).name, "components": components, "metrics": metrics}
