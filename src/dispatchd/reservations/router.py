"""HTTP routes of the reservation engine (seed 003 §2 and §4), under ``/v1``."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import AsyncIterator

from cachetools import TTLCache
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from limits import parse_many
from limits.aio import strategies as limit_strategies
from limits.storage import storage_from_string

from dispatchd.core import idempotency
from dispatchd.core.auth import Principal
from dispatchd.core.errors import DispatchdError
from dispatchd.deps import principal
from dispatchd.reservations.csvio import EXPORT_COLUMNS, reservation_row
from dispatchd.reservations.schemas import (
    AuditOut,
    Availability,
    ReservationCreate,
    ReservationOut,
    ResourceCreate,
    ResourceOut,
    ResourceUpdate,
    WaitingListEntryOut,
    WaitingListJoin,
)
from dispatchd.reservations.service import REFUSALS, Idempotency, ReservationService

router = APIRouter(prefix="/v1", tags=["reservations"])

#: the routes behind :func:`buyer` answer 429 RATE_LIMITED past DISPATCHD_RATE_LIMIT (problem+json)
UNKNOWN_RESOURCE = {404: {"description": "RESOURCE_NOT_FOUND: the resource_id names no resource"}}
RATE_LIMITED = {429: {"description": "RATE_LIMITED: over DISPATCHD_RATE_LIMIT for this key; see Retry-After"}}


class RateLimited(DispatchdError):
    status = 429
    code = "RATE_LIMITED"
    title = "Too many requests"


class RateLimiter:
    """Per API key limits (the ``limits`` library, moving window), e.g. ``"100/second;3000/minute"``.

    ``storage_uri`` ``memory://`` counts per process; ``redis://host:6379`` shares the count between
    instances (the async flavour of the storage is used)."""

    def __init__(self, spec: str, storage_uri: str = "memory://") -> None:
        self.items = parse_many(spec) if spec else []
        if not storage_uri.startswith("async+"):
            storage_uri = f"async+{storage_uri}"
        self.limiter = limit_strategies.MovingWindowRateLimiter(storage_from_string(storage_uri))

    async def check(self, key_id: str) -> None:
        for item in self.items:
            if not await self.limiter.hit(item, key_id):
                stats = await self.limiter.get_window_stats(item, key_id)
                retry_after = max(1, int(stats.reset_time - time.time()) + 1)
                raise RateLimited(
                    f"more than {item} for this API key; retry in {retry_after} s",
                    extra={"retry_after_s": retry_after},
                    headers={"Retry-After": str(retry_after)},
                )


class AvailabilityCache:
    """The read path of seed 003 §2.4: availability views kept ``ttl_s`` seconds, forgotten as soon as
    a transaction of this process changes the resource (other instances: at most ``ttl_s`` stale)."""

    def __init__(self, ttl_s: float) -> None:
        self.views: TTLCache[str, Availability] | None = None
        if ttl_s > 0:
            self.views = TTLCache(maxsize=50_000, ttl=ttl_s)

    def get(self, resource_id: str) -> Availability | None:
        return self.views.get(resource_id) if self.views is not None else None

    def put(self, view: Availability) -> None:
        if self.views is not None:
            self.views[view.resource_id] = view

    def on_commit(self, info: dict) -> None:
        if self.views is not None:
            for resource_id in info.get("resources_touched", ()):
                self.views.pop(resource_id, None)


async def service(request: Request) -> ReservationService:
    return request.app.state.services.reservations


async def buyer(request: Request, who: Principal = Depends(principal)) -> Principal:
    """Admin or integration key, within its rate limit."""
    who.require_staff()
    await request.app.state.services.domain("reservations").extras["rate_limiter"].check(who.key_id)
    return who


def _actor(who: Principal) -> str:
    return f"{who.role.value}:{who.key_id}"


def resource_out(resource) -> ResourceOut:
    return ResourceOut.model_validate(
        {
            **{
                c: getattr(resource, c)
                for c in ("id", "type", "name", "capacity", "reserved", "held", "state")
            },
            "version": resource.version,
            "metadata": resource.metadata_,
            "created_at": resource.created_at,
            "updated_at": resource.updated_at,
            "available": max(0, resource.capacity - resource.reserved - resource.held),
        }
    )


@router.post(
    "/resources", status_code=201, response_model=ResourceOut, summary="Put a resource on sale (admin)"
)
async def create_resource(
    body: ResourceCreate, who: Principal = Depends(principal), svc: ReservationService = Depends(service)
):
    who.require_admin()
    return resource_out(await svc.create_resource(body.model_dump(), _actor(who)))


@router.get(
    "/resources/{resource_id}", response_model=ResourceOut, summary="Read a resource", responses=RATE_LIMITED
)
async def get_resource(
    resource_id: str, who: Principal = Depends(buyer), svc: ReservationService = Depends(service)
):
    return resource_out(await svc.get_resource(resource_id))


@router.patch("/resources/{resource_id}", response_model=ResourceOut, summary="Change capacity (admin)")
async def update_resource(
    resource_id: str,
    body: ResourceUpdate,
    who: Principal = Depends(principal),
    svc: ReservationService = Depends(service),
):
    who.require_admin()
    return resource_out(await svc.set_capacity(resource_id, body.capacity, _actor(who)))


@router.post("/resources/{resource_id}/close", response_model=ResourceOut, summary="Stop selling (admin)")
async def close_resource(
    resource_id: str, who: Principal = Depends(principal), svc: ReservationService = Depends(service)
):
    who.require_admin()
    return resource_out(await svc.close(resource_id, _actor(who)))


@router.post("/resources/{resource_id}/reopen", response_model=ResourceOut, summary="Sell again (admin)")
async def reopen_resource(
    resource_id: str, who: Principal = Depends(principal), svc: ReservationService = Depends(service)
):
    who.require_admin()
    return resource_out(await svc.reopen(resource_id, _actor(who)))


@router.get(
    "/resources/{resource_id}/timeline",
    summary="The resource's history, from the event log",
    responses=RATE_LIMITED,
)
async def resource_timeline(
    resource_id: str,
    after: int = Query(0, ge=0, le=2**53, description="Only entries with id > after"),
    limit: int = Query(1000, ge=1, le=10_000),
    who: Principal = Depends(buyer),
    svc: ReservationService = Depends(service),
):
    page = await svc.timeline(resource_id, after, limit)
    return {"resource_id": resource_id, "events": [e.as_dict() for e in page]}


@router.get(
    "/availability",
    response_model=Availability,
    summary="Cached availability view",
    responses={**RATE_LIMITED, **UNKNOWN_RESOURCE},
)
async def availability(
    request: Request,
    response: Response,
    resource_id: str = Query(min_length=1, max_length=40),
    who: Principal = Depends(buyer),
    svc: ReservationService = Depends(service),
):
    """``X-Cache-Status: HIT`` when served from the cache (``DISPATCHD_AVAILABILITY_CACHE_S``), else MISS."""
    cache: AvailabilityCache = request.app.state.services.domain("reservations").extras["availability"]
    view = cache.get(resource_id)
    response.headers["X-Cache-Status"] = "HIT" if view else "MISS"
    if view is None:
        resource = await svc.get_resource(resource_id)
        view = Availability(
            resource_id=resource.id,
            state=resource.state,
            capacity=resource.capacity,
            reserved=resource.reserved,
            held=resource.held,
            available=max(0, resource.capacity - resource.reserved - resource.held),
            version=resource.version,
            as_of=svc.db.clock.now(),
        )
        cache.put(view)
    return view


@router.post(
    "/reservations",
    status_code=201,
    response_model=ReservationOut,
    summary="Reserve places: confirmed atomically, or refused (RESOURCE_FULL, RESOURCE_CLOSED)",
    responses={**RATE_LIMITED, **UNKNOWN_RESOURCE, 409: {"description": "RESOURCE_FULL or RESOURCE_CLOSED"}},
)
async def reserve(
    body: ReservationCreate,
    response: Response,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=255),
    who: Principal = Depends(buyer),
    svc: ReservationService = Depends(service),
):
    """With ``Idempotency-Key``, a retried request gets the first answer again (header
    ``Idempotent-Replayed: true``) instead of booking twice."""
    idem = None
    if idempotency_key:
        idem = Idempotency(f"{who.key_id}:{idempotency_key}", idempotency.fingerprint(body.model_dump()))
    outcome = await svc.reserve(body.resource_id, body.client_id, body.quantity, idem)
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if outcome.reservation is None:
        refusal = REFUSALS[outcome.refusal](outcome.detail)
        if outcome.replayed:
            refusal.headers["Idempotent-Replayed"] = "true"
        raise refusal
    return outcome.reservation


async def _csv_rows(svc: ReservationService, resource_id: str | None) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    async for batch in svc.iter_reservations(resource_id):
        writer.writerows(reservation_row(row) for row in batch)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()


@router.get(
    "/reservations/export.csv",
    summary="Every reservation as CSV, streamed",
    responses={
        **RATE_LIMITED,
        200: {"description": "CSV, text cells neutralised against formulas", "content": {"text/csv": {}}},
    },
)
async def export_reservations(
    resource_id: str | None = None,
    who: Principal = Depends(buyer),
    svc: ReservationService = Depends(service),
):
    return StreamingResponse(
        _csv_rows(svc, resource_id),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="reservations.csv"'},
    )


@router.get(
    "/reservations/{reservation_id}",
    response_model=ReservationOut,
    summary="Read a reservation",
    responses=RATE_LIMITED,
)
async def get_reservation(
    reservation_id: str, who: Principal = Depends(buyer), svc: ReservationService = Depends(service)
):
    return await svc.get_reservation(reservation_id)


@router.post(
    "/reservations/{reservation_id}/cancel",
    response_model=ReservationOut,
    summary="Cancel a reservation",
    responses=RATE_LIMITED,
)
async def cancel_reservation(
    reservation_id: str, who: Principal = Depends(buyer), svc: ReservationService = Depends(service)
):
    return await svc.cancel(reservation_id)


@router.post(
    "/waiting-list/join",
    status_code=201,
    response_model=WaitingListEntryOut,
    summary="Queue for a sold-out resource",
    responses={**RATE_LIMITED, **UNKNOWN_RESOURCE},
)
async def join_waiting_list(
    body: WaitingListJoin, who: Principal = Depends(buyer), svc: ReservationService = Depends(service)
):
    return await svc.join_waiting_list(body.resource_id, body.client_id, body.quantity, body.contact)


@router.get(
    "/waiting-list/{entry_id}",
    response_model=WaitingListEntryOut,
    summary="Read a waiting-list entry",
    responses=RATE_LIMITED,
)
async def get_entry(
    entry_id: str, who: Principal = Depends(buyer), svc: ReservationService = Depends(service)
):
    return await svc.get_entry(entry_id)


@router.post(
    "/waiting-list/{entry_id}/confirm",
    status_code=201,
    response_model=ReservationOut,
    summary="Take the place held for this entry, before its hold expires",
    responses=RATE_LIMITED,
)
async def confirm_entry(
    entry_id: str, who: Principal = Depends(buyer), svc: ReservationService = Depends(service)
):
    return await svc.confirm_waiting_list(entry_id)


@router.delete(
    "/waiting-list/{entry_id}",
    response_model=WaitingListEntryOut,
    summary="Leave the waiting list",
    responses=RATE_LIMITED,
)
async def leave_waiting_list(
    entry_id: str, who: Principal = Depends(buyer), svc: ReservationService = Depends(service)
):
    return await svc.leave_waiting_list(entry_id)


@router.get(
    "/audit", response_model=list[AuditOut], summary="Admin actions: who, what, before and after (admin)"
)
async def audit_log(
    target_id: str | None = None,
    action: str | None = None,
    after: int = Query(0, ge=0, le=2**53, description="Only entries with id > after"),
    limit: int = Query(100, ge=1, le=1000),
    who: Principal = Depends(principal),
    svc: ReservationService = Depends(service),
):
    who.require_admin()
    return await svc.audit_log(target_id=target_id, action=action, after_id=after, limit=limit)
