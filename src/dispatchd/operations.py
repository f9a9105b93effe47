"""Operations routes: liveness ``/health``, readiness ``/ready``, Prometheus ``/metrics``, and the
component report ``/v1/health`` (seed 000 "Health checks"). They read ``app.state.services`` only."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dispatchd import __version__, health
from dispatchd.core.auth import Principal
from dispatchd.core.health import Level, sweeper_state
from dispatchd.deps import principal

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: the process answers")
async def liveness() -> dict:
    """``{"status": "ok", "version", "pid"}``: ``pid`` tells apart the processes of ``serve --workers N``
    answering on one port."""
    return {"status": "ok", "version": __version__, "pid": os.getpid()}


@router.get("/ready", summary="Readiness: database reachable, sweeper alive, not lagging")
async def readiness(request: Request) -> JSONResponse:
    """200 ``{"ready": true, "checks": {…}}`` or 503 when the database is unreachable or the sweeper is
    dead or CRITICAL (lag beyond ``DISPATCHD_SWEEPER_LAG_CRITICAL_S``)."""
    services = request.app.state.services
    checks: dict[str, object] = {}
    ready = True
    try:
        await services.db.ping()
        checks["database"] = "ok"
        level, state = await sweeper_state(services.sweeper, services.settings)
        checks["sweeper"] = state
        ready = level is not Level.CRITICAL
    except Exception as exc:
        checks["database"] = type(exc).__name__
        ready = False
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    responses={200: {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format; each domain refreshes its gauges (backlogs, utilisation) first."""
    for domain in request.app.state.services.domains:
        if domain.refresh_metrics is not None:
            await domain.refresh_metrics()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/health", summary="Component health (seed 000): HEALTHY / WARNING / CRITICAL")
async def component_health(request: Request, who: Principal = Depends(principal)) -> dict:
    """Staff only. ``{"overall", "components": {name: {"status", …}}, "metrics": {…}}``."""
    who.require_staff()
    services = request.app.state.services
    return await health.health_report(services.db, services.sweeper, services.domains, services.settings)
