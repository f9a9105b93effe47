"""The FastAPI application, assembled: the core routes, each domain's routers, the operations routes,
the middleware and problem handlers, and the background loops in the lifespan.

The composition root is :mod:`dispatchd.assembly`; this module knows no domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Collection
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from dispatchd import __version__, operations
from dispatchd.assembly import Services, build_services
from dispatchd.config import Settings, load_settings
from dispatchd.core import router as core_router
from dispatchd.core.clock import Clock
from dispatchd.core.http import BodyLimit, RequestContext, install_problem_handlers
from dispatchd.core.logging import get_logger
from dispatchd.core.openapi import document_problems

__all__ = ["Services", "build_services", "create_app"]

log = get_logger("dispatchd.app")

#: browser assets served at ``/static/`` (``dispatchd-stream.js``)
STATIC = Path(__file__).parent / "static"

DESCRIPTION = """
Self-hosted dispatch engine for businesses that run on WhatsApp.

* **Matching** (seed 000): a booking is offered to every available driver; the first accept wins,
  exactly once. Offers expire after 30 s, searches after 5 min (then the customer and admins are told).
* **Event log**: every state change, in order, resumable with `GET /v1/events?after=`.
* **Outbox**: every outgoing message is a row written with the change that causes it.
* **Inbound inbox**: every WhatsApp message received is stored once and routed to the domain that
  answers it (a driver's tap, a customer's reply), retried until routed; `GET /v1/inbound`.
* **Reservations** (seed 003): capacity-limited resources booked atomically, never overbooked, with a
  waiting list, an audit log, `Idempotency-Key` and per-key rate limits.

Authenticate with `Authorization: Bearer <api key>`. Errors are RFC 9457 `application/problem+json`
with a stable `code`.
"""

CORE_TAGS = (
    {"name": "events", "description": "The append-only event log"},
    {"name": "auth", "description": "API keys"},
    {"name": "operations", "description": "Probes, health, metrics"},
)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    run_migrations: bool = True,
    background: bool = True,
    services: Services | None = None,
    skip_loops: Collection[str] = (),
) -> FastAPI:
    """Build the application. ``background=False`` leaves the sweeper and the domains' loops to the
    caller (tests drive them with ``run_once`` and a manual clock); ``services`` shares built ones;
    ``skip_loops`` names background loops this process does not run (``{"delivery"}``: `dispatchd
    worker` processes deliver)."""
    settings = settings or load_settings()
    services = services or build_services(settings, clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from dispatchd.migrate import prepare_database

        await prepare_database(services.db, settings, migrate=run_migrations)
        stop = asyncio.Event()
        tasks = []
        if background:
            loops = {"sweeper": services.sweeper.run_forever}
            for domain in services.domains:
                loops.update(domain.background)
            loops = {name: run for name, run in loops.items() if name not in skip_loops}
            tasks = [asyncio.create_task(run(stop), name=name) for name, run in loops.items()]
        log.info(
            "dispatchd started",
            version=__version__,
            database=services.db.dialect,
            background=background,
            loops=sorted(task.get_name() for task in tasks),
            pid=os.getpid(),
        )
        try:
            yield
        finally:
            stop.set()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await services.aclose()
            log.info("dispatchd stopped")

    tags = [tag for domain in services.domains for tag in domain.openapi_tags]
    app = FastAPI(
        title="dispatchd",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[*tags, *CORE_TAGS],
    )
    app.state.services = services
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        limits={"/v1/webhooks/": settings.webhook_max_body_bytes},
    )
    app.add_middleware(RequestContext)  # added last: outermost, so a 413 carries the request id too
    install_problem_handlers(app)
    app.include_router(core_router.router)
    for domain in services.domains:
        for router in domain.routers:
            app.include_router(router)
    app.include_router(operations.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    document_problems(app)
    return app
