"""Tables of seed 003 §1.2: resources, reservations, waiting list entries; plus the admin audit log."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.db import Base
from dispatchd.core.types import BigIntPK, UTCDateTime


class ResourceState(StrEnum):
    OPEN = "OPEN"
    CLOSED = "CLOSED"


class ReservationStatus(StrEnum):
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"


class EntryStatus(StrEnum):
    WAITING = "WAITING"
    OFFERED = "OFFERED"  # a place is held for this entry until hold_expires_at
    CONFIRMED = "CONFIRMED"
    EXPIRED = "EXPIRED"
    LEFT = "LEFT"


class Resource(Base):
    """A capacity-limited thing. ``reserved`` counts confirmed places, ``held`` places kept for the
    waiting list; ``reserved + held <= capacity`` always (a CHECK constraint backs the conditional
    updates)."""

    __tablename__ = "resources"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    type: Mapped[str] = mapped_column(String(60))
    name: Mapped[str] = mapped_column(String(200))
    capacity: Mapped[int] = mapped_column(Integer)
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    held: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(10))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint(
            "reserved >= 0 AND held >= 0 AND reserved + held <= capacity", name="within_capacity"
        ),
        Index("ix_resources_state", "state"),
    )


class Reservation(Base):
    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(40), ForeignKey("resources.id"))
    client_id: Mapped[str] = mapped_column(String(200))
    quantity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12))
    waiting_list_entry_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_reservations_resource_id_created_at", "resource_id", "created_at"),
        Index("ix_reservations_client_id", "client_id"),
    )


class WaitingListEntry(Base):
    __tablename__ = "waiting_list_entries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(40), ForeignKey("resources.id"))
    client_id: Mapped[str] = mapped_column(String(200))
    contact: Mapped[str | None] = mapped_column(String(200))
    quantity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    offered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    hold_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reservation_id: Mapped[str | None] = mapped_column(String(40))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_waiting_list_entries_resource_id_status_created_at", "resource_id", "status", "created_at"),
        Index("ix_waiting_list_entries_status_hold_expires_at", "status", "hold_expires_at"),
    )


class AuditEntry(Base):
    """One admin action: who (API key), what, on which target, state before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(60))
    action: Mapped[str] = mapped_column(String(40))
    target_type: Mapped[str] = mapped_column(String(40))
    target_id: Mapped[str] = mapped_column(String(40))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_audit_log_target_id_at", "target_id", "at"),)
