"""The matching domain (seed 000) as the app assembles it: its service, routes, three deadlines,
inbound handlers (offer taps, typed answers, the customer's 1/2/3), the coalescers of paced driver
messages, its health component, and the ``driver`` subject of driver keys."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import topics
from dispatchd.core.wiring import Context, Domain
from dispatchd.matching import alerts, deadlines, inbound, messages, reports, router
from dispatchd.matching.health import matching_health
from dispatchd.matching.models import Driver
from dispatchd.matching.service import MatchingService
from dispatchd.matching.types import Category, MatchingConfig
from dispatchd.matching.zones import load_zones


async def _driver_exists(session: AsyncSession, driver_id: str) -> bool:
    return await session.scalar(select(Driver.id).where(Driver.id == driver_id)) is not None


def build(context: Context) -> Domain:
    settings, db = context.settings, context.db
    service = MatchingService(
        db,
        MatchingConfig(
            offer_timeout_s=settings.offer_timeout_s,
            search_timeout_s=settings.search_timeout_s,
            wave_retry_s=settings.wave_retry_s,
            escalation_radius_factor=settings.escalation_radius_factor,
            driver_stale_after_s=settings.driver_stale_after_s,
            admin_phones=tuple(settings.admin_phones),
            search_progress_interval_s=settings.search_progress_interval_s,
            timezone=settings.timezone,
        ),
        zones=load_zones(settings.zones_geojson, settings.zone_geohash_precision),
    )
    report_scheduler = reports.ReportScheduler(
        service.zones,
        reports.ReportConfig(
            daily_schedule=settings.report_daily_schedule,
            weekly_schedule=settings.report_weekly_schedule,
            timezone=settings.timezone,
            admin_phones=tuple(settings.admin_phones),
            admin_emails=tuple(settings.admin_emails),
        ),
    )

    async def health():
        return await matching_health(db)

    return Domain(
        name="matching",
        service=service,
        routers=(router.router,),
        openapi_tags=(
            {"name": "matching", "description": "Drivers, bookings, broadcast matching (seed 000)"},
        ),
        deadlines=[*deadlines.deadlines(service), report_scheduler.deadline()],
        extras={"reports": report_scheduler},
        inbound_handlers=inbound.handlers(service),
        coalescers={
            Category.DRIVER_OFFER: messages.combine_offers,
            Category.OFFER_TAKEN: messages.combine_taken,
        },
        health=health,
        subjects={topics.DRIVER: _driver_exists},
        alert_rules=alerts.rules(settings),
    )
