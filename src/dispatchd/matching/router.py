"""HTTP routes of matching (seed 000), under ``/v1``."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from dispatchd.core.auth import Principal
from dispatchd.core.errors import Forbidden, InvalidInput
from dispatchd.core.schemas import UtcDateTime
from dispatchd.deps import principal
from dispatchd.matching import reports, stats
from dispatchd.matching.models import DriverStatus
from dispatchd.matching.schemas import (
    BookingCreate,
    BookingOut,
    CancelIn,
    CompleteIn,
    DriverCreate,
    DriverOut,
    DriverResponseIn,
    DriverUpdate,
    Heartbeat,
    MatchingRequest,
    MatchingResultOut,
    OfferOut,
    ResponseResultOut,
)
from dispatchd.matching.service import MatchingOptions, MatchingService

router = APIRouter(prefix="/v1", tags=["matching"])


async def service(request: Request) -> MatchingService:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request
    return request.app.state.services.matching


@router.post("/drivers", status_code=201, response_model=DriverOut, summary="Register a driver")
async def create_driver(
    body: DriverCreate, who: Principal = Depends(principal), matching: MatchingService = Depends(service)
):
    who.require_staff()
    return await matching.create_driver(body.model_dump())


@router.get("/drivers", response_model=list[DriverOut], summary="List drivers")
async def list_drivers(
    status: DriverStatus | None = None,
    limit: int = Query(500, ge=1, le=10_000),
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    who.require_staff()
    return await matching.list_drivers(status, limit)


@router.get("/drivers/{driver_id}", response_model=DriverOut, summary="Read a driver")
async def get_driver(
    driver_id: str, who: Principal = Depends(principal), matching: MatchingService = Depends(service)
):
    who.require_driver(driver_id)
    return await matching.get_driver(driver_id)


@router.patch("/drivers/{driver_id}", response_model=DriverOut, summary="Change status, position or profile")
async def update_driver(
    driver_id: str,
    body: DriverUpdate,
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    who.require_driver(driver_id)
    changes = body.model_dump(exclude_unset=True)
    nulls = sorted(k for k, v in changes.items() if v is None and k not in ("lat", "lon"))
    if nulls:
        raise InvalidInput(f"{', '.join(nulls)} cannot be null")
    if not who.is_staff and set(changes) - {"status", "lat", "lon"}:
        raise Forbidden("a driver key may change only status, lat and lon")
    if (changes.get("lat") is None) != (changes.get("lon") is None):
        raise InvalidInput("lat and lon go together")
    return await matching.update_driver(driver_id, changes)


@router.post("/drivers/{driver_id}/heartbeat", response_model=DriverOut, summary="Driver app is alive")
async def heartbeat(
    driver_id: str,
    body: Heartbeat | None = None,
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    who.require_driver(driver_id)
    body = body or Heartbeat()
    if (body.lat is None) != (body.lon is None):
        raise InvalidInput("lat and lon go together")
    return await matching.heartbeat(driver_id, body.lat, body.lon)


@router.post("/bookings", status_code=201, response_model=BookingOut, summary="Create a booking (PENDING)")
async def create_booking(
    body: BookingCreate, who: Principal = Depends(principal), matching: MatchingService = Depends(service)
):
    who.require_staff()
    return await matching.create_booking(body.model_dump())


@router.get("/bookings/{booking_id}", response_model=BookingOut, summary="Read a booking")
async def get_booking(
    booking_id: str, who: Principal = Depends(principal), matching: MatchingService = Depends(service)
):
    booking = await matching.get_booking(booking_id)
    if not who.is_staff and booking.driver_id != who.driver_id:
        offers = await matching.list_offers(booking_id)
        if all(offer.driver_id != who.driver_id for offer in offers):
            raise Forbidden("a driver key may read only the bookings it was offered")
    return booking


@router.post(
    "/bookings/{booking_id}/matching",
    response_model=MatchingResultOut,
    summary="Start matching: offer the booking to every available driver",
)
async def start_matching(
    booking_id: str,
    body: MatchingRequest | None = None,
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    who.require_staff()
    body = body or MatchingRequest()
    options = MatchingOptions(body.max_distance_km, tuple(body.exclude_driver_ids), body.priority_mode)
    result = await matching.start_matching(booking_id, options)
    return MatchingResultOut(
        success=result.success,
        drivers_notified=result.drivers_notified,
        driver_ids=result.driver_ids,
        errors=result.errors,
        matching_metrics_id=result.matching_metrics_id,
        booking=BookingOut.model_validate(result.booking),
    )


@router.post(
    "/bookings/{booking_id}/responses",
    response_model=ResponseResultOut,
    summary="A driver accepts or rejects an offer; the first accept wins",
)
async def respond(
    booking_id: str,
    body: DriverResponseIn,
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    who.require_driver(body.driver_id)
    result = await matching.respond(booking_id, body.driver_id, body.type)
    # The hot path of an accept race: a plain JSON answer, not built and validated again through the model.
    return JSONResponse(
        {
            "success": result.success,
            "action": result.action.value,
            "message": result.message,
            "booking_id": result.booking_id,
            "driver_id": result.driver_id,
        }
    )


@router.post("/bookings/{booking_id}/cancel", response_model=BookingOut, summary="Cancel a booking")
async def cancel(
    booking_id: str,
    body: CancelIn,
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    who.require_staff()
    return await matching.cancel(booking_id, body.reason)


@router.post("/bookings/{booking_id}/complete", response_model=BookingOut, summary="End an assigned trip")
async def complete(
    booking_id: str,
    body: CompleteIn | None = None,
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    body = body or CompleteIn()
    if (body.lat is None) != (body.lon is None):
        raise InvalidInput("lat and lon go together")
    if not who.is_staff:
        booking = await matching.get_booking(booking_id)
        who.require_driver(booking.driver_id or "")
    return await matching.complete(booking_id, body.lat, body.lon)


@router.get("/bookings/{booking_id}/offers", response_model=list[OfferOut], summary="Offers of a booking")
async def list_offers(
    booking_id: str, who: Principal = Depends(principal), matching: MatchingService = Depends(service)
):
    who.require_staff()
    return await matching.list_offers(booking_id)


@router.get("/matching/stats", summary="Matching statistics over [from, to)")
async def matching_stats(
    request: Request,
    start: Annotated[UtcDateTime | None, Query(alias="from", description="default: 24 h before `to`")] = None,
    end: Annotated[UtcDateTime | None, Query(alias="to", description="default: now")] = None,
    group_by: Annotated[
        Literal["hour", "zone"] | None,
        Query(
            description="also `groups`: the metrics per local hour (0–23, DISPATCHD_TIMEZONE) or per zone "
            "(a named polygon of DISPATCHD_ZONES_GEOJSON, else the pickup's geohash cell), and `peak_hours`"
        ),
    ] = None,
    who: Principal = Depends(principal),
    matching: MatchingService = Depends(service),
):
    who.require_staff()
    db = request.app.state.services.db
    end = end or db.clock.now()
    start = start or end - timedelta(hours=24)
    if start >= end:
        raise InvalidInput("'from' must be before 'to'")
    result = await stats.matching_stats(db, start, end)
    if group_by is not None:
        timezone = matching.config.timezone
        result["group_by"], result["timezone"] = group_by, timezone
        result["groups"] = await reports.stats_by(db, matching.zones, timezone, start, end, group_by)
    return result
