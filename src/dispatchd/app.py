"""The FastAPI application: routers, error mapping, request ids, probes, and the background loops.

``create_app()`` is the composition root: it builds the database, the services, the sweeper and the
delivery worker from the settings, and starts the loops in the lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dispatchd import __version__, health
from dispatchd.config import Settings, load_settings
from dispatchd.core import router as core_router
from dispatchd.core.auth import Principal
from dispatchd.core.clock import Clock
from dispatchd.core.db import Database
from dispatchd.core.errors import DispatchdError, problem
from dispatchd.core.logging import get_logger
from dispatchd.core.sweeper import Deadline, Sweeper
from dispatchd.deps import PrincipalCache, principal
from dispatchd.matching import deadlines, messages
from dispatchd.matching import router as matching_router
from dispatchd.matching.service import Category, MatchingConfig, MatchingService
from dispatchd.notifications import admin as notifications_admin
from dispatchd.notifications import router as notifications_router
from dispatchd.notifications import webhooks
from dispatchd.notifications.alerts import AlertMonitor, Thresholds, combine_alerts
from dispatchd.notifications.delivery import DeliveryWorker
from dispatchd.notifications.expiry import OutboxExpiry
from dispatchd.notifications.wiring import build_lanes
from dispatchd.reservations import metrics as reservation_metrics
from dispatchd.reservations import router as reservations_router
from dispatchd.reservations.router import AvailabilityCache, RateLimiter
from dispatchd.reservations.service import ReservationsConfig, ReservationService

log = get_logger("dispatchd.app")

PROBLEM_JSON = "application/problem+json"

DESCRIPTION = """
Self-hosted dispatch engine for businesses that run on WhatsApp.

* **Matching** (seed 000): a booking is offered to every available driver; the first accept wins,
  exactly once. Offers expire after 30 s, searches after 5 min (then the customer and admins are told).
* **Event log**: every state change, in order, resumable with `GET /v1/events?after=`.
* **Outbox**: every outgoing message is a row written with the change that causes it.
* **Reservations** (seed 003): capacity-limited resources booked atomically, never overbooked, with a
  waiting list, an audit log, `Idempotency-Key` and per-key rate limits.

Authenticate with `Authorization: Bearer <api key>`. Errors are RFC 9457 `application/problem+json`
with a stable `code`.
"""


@dataclass
class Services:
    """Everything one process runs; the tests build it with a manual clock."""

    settings: Settings
    db: Database
    matching: MatchingService
    reservations: ReservationService
    sweeper: Sweeper
    delivery: DeliveryWorker
    alerts: AlertMonitor


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    """Wire the database, the matching service, the sweeper and the delivery worker."""
    db = Database(settings.database_url, clock=clock)
    matching = MatchingService(
        db,
        MatchingConfig(
            offer_timeout_s=settings.offer_timeout_s,
            search_timeout_s=settings.search_timeout_s,
            wave_retry_s=settings.wave_retry_s,
            escalation_radius_factor=settings.escalation_radius_factor,
            driver_stale_after_s=settings.driver_stale_after_s,
            admin_phones=tuple(settings.admin_phones),
        ),
    )
    reservations = ReservationService(db, ReservationsConfig(hold_s=settings.waiting_list_hold_s))
    sweeper = Sweeper(db, interval_s=settings.sweep_interval_s, batch_size=settings.sweep_batch_size)
    deadlines.register(sweeper, matching)
    sweeper.register(
        Deadline("waiting_list_hold", reservations.expire_due_holds, reservations.oldest_due_hold)
    )
    delivery = DeliveryWorker(
        db,
        lanes=build_lanes(settings, db.clock),
        batch_size=settings.delivery_batch_size,
        concurrency=settings.delivery_concurrency,
        loops=4,
        lease_s=settings.delivery_lease_s,
        recipient_interval_s=settings.recipient_interval_s,
        templates=settings.whatsapp_templates,
        coalescers={
            Category.DRIVER_OFFER: messages.combine_offers,
            Category.OFFER_TAKEN: messages.combine_taken,
            Category.ADMIN_ALERT: combine_alerts,
        },
    )
    expiry = OutboxExpiry()
    sweeper.register(Deadline("notification_expiry", expiry.expire_due, expiry.oldest_due))
    alerts = AlertMonitor(
        db,
        delivery.breakers,
        admin_phones=tuple(settings.admin_phones),
        admin_emails=tuple(settings.admin_emails),
        thresholds=Thresholds(latency_alert_s=settings.notification_latency_alert_s),
    )
    return Services(settings, db, matching, reservations, sweeper, delivery, alerts)


SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


class RequestContext:
    """Pure ASGI middleware: a request id per request (``X-Request-ID`` in and out), bound to every log
    line, one access log line, and the security headers (OWASP secure headers: nosniff, DENY framing,
    no referrer, same-origin resources)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            await _refuse_nul(scope, send)
            return
        headers = dict(scope.get("headers") or ())
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:200] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                    *SECURITY_HEADERS,
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )


async def _refuse_nul(scope, send) -> None:
    """A NUL character in the path or query: refused before routing (no database can store one)."""
    body = json.dumps(
        problem(
            status=400,
            code="MALFORMED_REQUEST",
            title="Malformed request",
            detail="the URL contains a NUL character",
            instance=scope["path"].replace("\x00", ""),
        )
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", PROBLEM_JSON.encode()), *SECURITY_HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _problem_response(
    request: Request, status: int, code: str, title: str, detail: str, headers: dict | None = None, **extra
) -> JSONResponse:
    body = problem(
        status=status,
        code=code,
        title=title,
        detail=detail,
        instance=request.url.path,
        request_id=getattr(request.state, "request_id", None),
        **extra,
    )
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DispatchdError)
    async def _domain_error(request: Request, exc: DispatchdError) -> JSONResponse:
        return _problem_response(
            request, exc.status, exc.code, exc.title, exc.detail, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(error.get("type") == "json_invalid" for error in errors):
            return _problem_response(
                request, 400, "MALFORMED_JSON", "Malformed JSON", "the request body is not valid JSON"
            )
        details = [
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": error.get("msg", ""),
                "type": error.get("type"),
            }
            for error in errors
        ]
        summary = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
        return _problem_response(request, 422, "VALIDATION_ERROR", "Invalid input", summary, errors=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 401: "UNAUTHORIZED", 403: "FORBIDDEN"}
        code = codes.get(exc.status_code, f"HTTP_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else code
        return _problem_response(request, exc.status_code, code, code.replace("_", " ").capitalize(), detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        return _problem_response(
            request,
            500,
            "INTERNAL_ERROR",
            "Internal error",
            "an unexpected error occurred; see the server log",
        )


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    run_migrations: bool = True,
    background: bool = True,
    services: Services | None = None,
) -> FastAPI:
    """Build the application. ``background=False`` leaves the sweeper and delivery loops to the caller
    (tests drive them with ``run_once`` and a manual clock); ``services`` shares already built ones."""
    settings = settings or load_settings()
    services = services or build_services(settings, clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from dispatchd.migrate import prepare_database

        await prepare_database(services.db, settings, migrate=run_migrations)
        stop = asyncio.Event()
        tasks = []
        if background:
            tasks = [
                asyncio.create_task(services.sweeper.run_forever(stop), name="sweeper"),
                asyncio.create_task(services.delivery.run_forever(stop), name="delivery"),
                asyncio.create_task(services.alerts.run_forever(stop), name="alerts"),
            ]
        log.info(
            "dispatchd started", version=__version__, database=services.db.dialect, background=background
        )
        try:
            yield
        finally:
            stop.set()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await services.db.dispose()
            log.info("dispatchd stopped")

    app = FastAPI(
        title="dispatchd",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "matching", "description": "Drivers, bookings, broadcast matching (seed 000)"},
            {"name": "events", "description": "The append-only event log"},
            {"name": "notifications", "description": "The outbox of outgoing messages"},
            {
                "name": "reservations",
                "description": "Capacity booked atomically, waiting list, admin (seed 003)",
            },
            {"name": "auth", "description": "API keys"},
            {"name": "webhooks", "description": "WhatsApp Cloud API webhooks (signed by Meta)"},
            {"name": "operations", "description": "Probes, health, metrics"},
        ],
    )
    app.state.services = services
    app.state.settings = settings
    app.state.db = services.db
    app.state.matching = services.matching
    app.state.sweeper = services.sweeper
    app.state.delivery = services.delivery
    app.state.reservations = services.reservations
    app.state.principals = PrincipalCache(settings.auth_cache_s)
    app.state.rate_limiter = RateLimiter(settings.rate_limit, settings.rate_limit_storage)
    app.state.availability = AvailabilityCache(settings.availability_cache_s)
    services.db.after_commit.append(app.state.availability.on_commit)

    app.add_middleware(RequestContext)
    _install_error_handlers(app)
    app.include_router(matching_router.router)
    app.include_router(core_router.router)
    app.include_router(notifications_router.router)
    app.include_router(reservations_router.router)
    app.include_router(webhooks.router)

    @app.get("/health", tags=["operations"], summary="Liveness: the process answers")
    async def liveness() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get(
        "/ready", tags=["operations"], summary="Readiness: database reachable, sweeper alive, not lagging"
    )
    async def readiness() -> JSONResponse:
        checks: dict[str, object] = {}
        ready = True
        try:
            await services.db.ping()
            checks["database"] = "ok"
            level, state = await health.sweeper_state(services.sweeper, settings)
            checks["sweeper"] = state
            ready = level is not health.Level.CRITICAL
        except Exception as exc:
            checks["database"] = type(exc).__name__
            ready = False
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        await notifications_admin.backlog(services.db)  # refreshes the outbox gauges
        active, utilization = await services.reservations.utilization()
        reservation_metrics.ACTIVE_RESOURCES.set(active)
        reservation_metrics.CAPACITY_UTILIZATION.set(utilization or 0.0)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/v1/health", tags=["operations"], summary="Component health (seed 000): HEALTHY / WARNING / CRITICAL"
    )
    async def component_health(who: Principal = Depends(principal)) -> dict:
        who.require_staff()
        return await health.health_report(services.db, services.sweeper, services.delivery, settings)

    return app
