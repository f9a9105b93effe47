"""The reservations domain (seed 003) as the app assembles it: its service, routes, waiting-list hold
deadline, per-key rate limiter, availability cache and capacity gauges."""

from __future__ import annotations

from dispatchd.core.sweeper import Deadline
from dispatchd.core.wiring import Context, Domain
from dispatchd.reservations import metrics, router
from dispatchd.reservations.router import AvailabilityCache, RateLimiter
from dispatchd.reservations.service import ReservationsConfig, ReservationService


def build(context: Context) -> Domain:
    settings = context.settings
    service = ReservationService(
        context.db,
        ReservationsConfig(hold_s=settings.waiting_list_hold_s, batch_max=settings.reservation_batch_max),
    )
    availability = AvailabilityCache(settings.availability_cache_s)

    async def refresh_metrics() -> None:
        active, utilization = await service.utilization()
        metrics.ACTIVE_RESOURCES.set(active)
        metrics.CAPACITY_UTILIZATION.set(utilization or 0.0)

    return Domain(
        name="reservations",
        service=service,
        routers=(router.router,),
        openapi_tags=(
            {
                "name": "reservations",
                "description": "Capacity booked atomically, waiting list, admin (seed 003)",
            },
        ),
        deadlines=(Deadline("waiting_list_hold", service.expire_due_holds, service.oldest_due_hold),),
        refresh_metrics=refresh_metrics,
        on_commit=(availability.on_commit,),
        extras={
            "rate_limiter": RateLimiter(settings.rate_limit, settings.rate_limit_storage),
            "availability": availability,
        },
    )
