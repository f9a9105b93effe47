"""Request and response bodies of the reservations API (seed 003 §2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from dispatchd.core.schemas import SmallObject, StrictModel
from dispatchd.reservations.models import EntryStatus, ReservationStatus, ResourceState

ResourceIdField = Field(default=None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.:\-]+$")


class ResourceCreate(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={
            "examples": [
                {"type": "seat", "name": "Dakar → Thiès 07:00, bus 12", "capacity": 45},
                {
                    "id": "tech-awa-2026-01-05-am",
                    "type": "technician_half_day",
                    "name": "Awa, lundi matin",
                    "capacity": 1,
                    "metadata": {"zone": "Plateau"},
                },
            ]
        },
    )

    id: str | None = ResourceIdField
    type: str = Field(min_length=1, max_length=60)
    name: str = Field(min_length=1, max_length=200)
    capacity: StrictInt = Field(ge=0, le=1_000_000)
    metadata: SmallObject | None = None


class ResourceUpdate(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"capacity": 50}]})

    capacity: StrictInt = Field(ge=0, le=1_000_000)


class ResourceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: str
    type: str
    name: str
    capacity: int
    reserved: int
    held: int = Field(description="Places held for waiting-list entries that were offered them")
    available: int
    state: ResourceState
    version: int
    metadata: dict[str, Any] | None = Field(default=None, validation_alias="metadata_")
    created_at: datetime
    updated_at: datetime


class Availability(BaseModel):
    resource_id: str
    state: ResourceState
    capacity: int
    reserved: int
    held: int
    available: int
    version: int
    as_of: datetime = Field(description="When this view was read from the database (UTC)")


class ReservationCreate(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={
            "examples": [{"resource_id": "res_…", "client_id": "+221770000001", "quantity": 2}]
        },
    )

    resource_id: str = Field(min_length=1, max_length=40)
    client_id: str = Field(min_length=1, max_length=200)
    quantity: StrictInt = Field(default=1, ge=1, le=1000)


class ReservationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    resource_id: str
    client_id: str
    quantity: int
    status: ReservationStatus
    waiting_list_entry_id: str | None
    created_at: datetime = Field(description="Server timestamp: the authority on order")
    cancelled_at: datetime | None


class WaitingListJoin(StrictModel):
    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        json_schema_extra={
            "examples": [
                {"resource_id": "res_…", "client_id": "c-42", "quantity": 1, "contact": "+221770000001"}
            ]
        },
    )

    resource_id: str = Field(min_length=1, max_length=40)
    client_id: str = Field(min_length=1, max_length=200)
    quantity: StrictInt = Field(default=1, ge=1, le=1000)
    contact: str | None = Field(
        default=None, max_length=200, description="E.164 phone told when a place frees"
    )


class WaitingListEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    resource_id: str
    client_id: str
    quantity: int
    status: EntryStatus
    created_at: datetime
    offered_at: datetime | None
    hold_expires_at: datetime | None
    reservation_id: str | None


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    detail: str | None
