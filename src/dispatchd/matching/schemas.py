"""Request and response bodies of the matching API (seed 000 §2.2 types, snake_case)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dispatchd.core.phone import E164_PATTERN, is_e164
from dispatchd.core.schemas import StrictModel, UtcDateTime
from dispatchd.matching.models import BookingStatus, DriverStatus, PriorityMode

#: documents the E.164 rule in the OpenAPI (``_check_phone`` enforces it with the same expression)
E164_SCHEMA = {"pattern": E164_PATTERN}

Latitude = Annotated[float, Field(ge=-90, le=90, description="WGS84 degrees")]
Longitude = Annotated[float, Field(ge=-180, le=180, description="WGS84 degrees")]


#: fields that only mean something together: a position is a latitude and a longitude
POSITION_PAIRS = (("lat", "lon"), ("pickup_lat", "pickup_lon"), ("drop_lat", "drop_lon"))


class _Strict(StrictModel):
    """A matching body: a latitude without its longitude (or the reverse) is refused (422), and the
    OpenAPI says so with ``dependentRequired`` (JSON Schema 2020-12 §6.5.4)."""

    @model_validator(mode="after")
    def _positions_whole(self):
        fields = type(self).model_fields
        for lat, lon in POSITION_PAIRS:
            if lat in fields and (getattr(self, lat) is None) != (getattr(self, lon) is None):
                raise ValueError(f"{lat} and {lon} go together: send both or neither")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler.resolve_ref_schema(handler(core_schema))
        properties = schema.get("properties", {})
        dependent = {}
        for lat, lon in POSITION_PAIRS:
            if lat in properties and lon in properties:
                dependent |= {lat: [lon], lon: [lat]}
        if dependent:
            schema["dependentRequired"] = dependent
        return schema


def _check_phone(value: str) -> str:
    if not is_e164(value):
        raise ValueError("must be an E.164 number such as +221771234567")
    return value


class DriverCreate(_Strict):
    name: str = Field(min_length=1, max_length=200)
    phone: str = Field(description="E.164", examples=["+221771234567"], json_schema_extra=E164_SCHEMA)
    vehicle_type: str = Field(min_length=1, max_length=60, examples=["Berline"])
    vehicle_plate: str = Field(min_length=1, max_length=30, examples=["DK-1234-AB"])
    rating: float = Field(default=5.0, ge=0, le=5)
    status: Literal[DriverStatus.AVAILABLE, DriverStatus.OFFLINE] = DriverStatus.AVAILABLE
    lat: Latitude | None = None
    lon: Longitude | None = None

    _phone = field_validator("phone")(_check_phone)

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "Moussa Diop",
                    "phone": "+221771234567",
                    "vehicle_type": "Berline",
                    "vehicle_plate": "DK-1234-AB",
                    "rating": 4.8,
                    "lat": 14.6928,
                    "lon": -17.4467,
                }
            ]
        },
    )


class DriverUpdate(_Strict):
    status: Literal[DriverStatus.AVAILABLE, DriverStatus.OFFLINE, DriverStatus.BUSY] | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None
    name: str | None = Field(default=None, min_length=1, max_length=200)
    phone: str | None = Field(default=None, description="E.164", json_schema_extra=E164_SCHEMA)
    vehicle_type: str | None = Field(default=None, min_length=1, max_length=60)
    vehicle_plate: str | None = Field(default=None, min_length=1, max_length=30)
    rating: float | None = Field(default=None, ge=0, le=5)

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return None if value is None else _check_phone(value)

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [{"status": "OFFLINE"}]}
    )


class Heartbeat(_Strict):
    lat: Latitude | None = None
    lon: Longitude | None = None


class DriverOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    phone: str
    vehicle_type: str
    vehicle_plate: str
    rating: float
    status: DriverStatus
    lat: float | None
    lon: float | None
    last_seen_at: datetime
    current_booking_id: str | None
    created_at: datetime


class BookingCreate(_Strict):
    customer_name: str = Field(min_length=1, max_length=200)
    customer_phone: str = Field(description="E.164", json_schema_extra=E164_SCHEMA)
    pickup_address: str = Field(min_length=1, max_length=500)
    pickup_lat: Latitude | None = None
    pickup_lon: Longitude | None = None
    drop_address: str = Field(min_length=1, max_length=500)
    drop_lat: Latitude | None = None
    drop_lon: Longitude | None = None
    pickup_at: UtcDateTime | None = Field(default=None, description="ISO 8601 with an offset; stored UTC")

    _phone = field_validator("customer_phone")(_check_phone)

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={
            "examples": [
                {
                    "customer_name": "Awa Ndiaye",
                    "customer_phone": "+221770000001",
                    "pickup_address": "Place de l'Indépendance, Dakar",
                    "pickup_lat": 14.6681,
                    "pickup_lon": -17.4312,
                    "drop_address": "Aéroport AIBD",
                    "drop_lat": 14.6700,
                    "drop_lon": -17.0733,
                    "pickup_at": "2026-01-05T18:30:00Z",
                }
            ]
        },
    )


class BookingOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: BookingStatus
    driver_id: str | None
    version: int
    customer_name: str
    customer_phone: str
    pickup_address: str
    pickup_lat: float | None
    pickup_lon: float | None
    drop_address: str
    drop_lat: float | None
    drop_lon: float | None
    pickup_at: datetime | None
    wave: int
    search_started_at: datetime | None
    search_deadline_at: datetime | None
    assigned_at: datetime | None
    finished_at: datetime | None
    cancel_reason: str | None
    customer_answer: str | None = Field(
        default=None, description="After a TIMEOUT, the customer's answer: RELAUNCHED, LATER or CANCELLED"
    )
    created_at: datetime


class MatchingRequest(_Strict):
    """Seed 000 §2.2 MatchingOptions."""

    max_distance_km: float | None = Field(default=None, gt=0, le=20_000, description="km; unset = unlimited")
    exclude_driver_ids: list[Annotated[str, Field(max_length=40)]] = Field(
        default_factory=list, max_length=10_000
    )
    priority_mode: PriorityMode = PriorityMode.RECENT_ACTIVITY

    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={"examples": [{}, {"max_distance_km": 5, "priority_mode": "DISTANCE"}]},
    )


class MatchingResultOut(BaseModel):
    """Seed 000 §2.2 MatchingResult."""

    success: bool
    drivers_notified: int
    driver_ids: list[str]
    errors: list[str]
    matching_metrics_id: str
    booking: BookingOut


class DriverResponseIn(_Strict):
    driver_id: str = Field(min_length=1, max_length=40)
    type: Literal["ACCEPT", "REJECT"]
    response_time_ms: int | None = Field(
        default=None, ge=0, description="Client-measured, informational: stats use the server's clock"
    )

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"driver_id": "drv_…", "type": "ACCEPT"}]}
    )


class ResponseResultOut(BaseModel):
    """Seed 000 §2.2 ResponseResult."""

    success: bool
    action: Literal[
        "ASSIGNED", "REJECTED", "ALREADY_TAKEN", "BOOKING_CANCELLED", "OFFER_EXPIRED", "DRIVER_BUSY"
    ]
    message: str
    booking_id: str
    driver_id: str


class CancelIn(_Strict):
    reason: str = Field(min_length=1, max_length=500, examples=["customer changed plans"])


class CompleteIn(_Strict):
    lat: Latitude | None = None
    lon: Longitude | None = None


class OfferOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    booking_id: str
    driver_id: str
    wave: int
    distance_km: float | None
    method: str
    sent_at: datetime
    expires_at: datetime
    responded_at: datetime | None
    response: str | None
    driver_answer: str | None
    response_time_ms: int | None
