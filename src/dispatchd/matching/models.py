"""Tables of seed 000 §1: drivers, bookings, booking offers (the seed's BookingNotification), metrics."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.db import Base
from dispatchd.core.types import UTCDateTime


class DriverStatus(StrEnum):
    AVAILABLE = "AVAILABLE"
    BUSY = "BUSY"
    OFFLINE = "OFFLINE"


class BookingStatus(StrEnum):
    PENDING = "PENDING"
    SEARCHING = "SEARCHING"
    ASSIGNED = "ASSIGNED"
    COMPLETED = "COMPLETED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"


#: A driver holds at most one booking in these statuses (a partial unique index enforces it).
ACTIVE_BOOKING_STATUSES = (BookingStatus.ASSIGNED,)


class OfferResponse(StrEnum):
    ACCEPTED = "ACCEPTED"
    REJECTED = "REJECTED"
    TIMEOUT = "TIMEOUT"  # the driver let the offer's 30 s pass
    TAKEN = "TAKEN"  # another driver won first
    CANCELLED = "CANCELLED"  # the booking was cancelled or its search ended


class PriorityMode(StrEnum):
    RECENT_ACTIVITY = "RECENT_ACTIVITY"
    DISTANCE = "DISTANCE"


class FinalStatus(StrEnum):
    MATCHED = "MATCHED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"


class Driver(Base):
    __tablename__ = "drivers"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str] = mapped_column(String(20), unique=True)
    vehicle_type: Mapped[str] = mapped_column(String(60))
    vehicle_plate: Mapped[str] = mapped_column(String(30))
    rating: Mapped[float] = mapped_column(Float, default=5.0)
    status: Mapped[str] = mapped_column(String(16))
    current_booking_id: Mapped[str | None] = mapped_column(String(40))
    lat: Mapped[float | None] = mapped_column(Float)
    lon: Mapped[float | None] = mapped_column(Float)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_drivers_status_last_seen_at", "status", "last_seen_at"),)


class Booking(Base):
    __tablename__ = "bookings"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    customer_name: Mapped[str] = mapped_column(String(200))
    customer_phone: Mapped[str] = mapped_column(String(20))
    pickup_address: Mapped[str] = mapped_column(Text)
    pickup_lat: Mapped[float | None] = mapped_column(Float)
    pickup_lon: Mapped[float | None] = mapped_column(Float)
    drop_address: Mapped[str] = mapped_column(Text)
    drop_lat: Mapped[float | None] = mapped_column(Float)
    drop_lon: Mapped[float | None] = mapped_column(Float)
    pickup_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    driver_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("drivers.id"))
    version: Mapped[int] = mapped_column(Integer, default=1)
    search_options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    search_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    search_deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_wave_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    #: the customer's 1 / 2 / 3 after a timed-out search: RELAUNCHED, LATER or CANCELLED (at most once)
    customer_answer: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_bookings_status_search_deadline_at", "status", "search_deadline_at"),
        Index("ix_bookings_status_next_wave_at", "status", "next_wave_at"),
        Index(
            "uq_bookings_active_driver",
            "driver_id",
            unique=True,
            sqlite_where=text("status = 'ASSIGNED'"),
            postgresql_where=text("status = 'ASSIGNED'"),
        ),
    )


class BookingOffer(Base):
    """One driver's offer for one booking (the seed's BookingNotification)."""

    __tablename__ = "booking_offers"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    booking_id: Mapped[str] = mapped_column(String(40), ForeignKey("bookings.id", ondelete="CASCADE"))
    driver_id: Mapped[str] = mapped_column(String(40), ForeignKey("drivers.id", ondelete="CASCADE"))
    wave: Mapped[int] = mapped_column(Integer)
    distance_km: Mapped[float | None] = mapped_column(Float)
    method: Mapped[str] = mapped_column(String(16), default="WHATSAPP")
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    responded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    response: Mapped[str | None] = mapped_column(String(16))
    driver_answer: Mapped[str | None] = mapped_column(String(8))
    response_time_ms: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("booking_id", "driver_id"),
        Index("ix_booking_offers_sent_at", "sent_at"),
        Index("ix_booking_offers_response", "response"),
        Index("ix_booking_offers_driver_id_sent_at", "driver_id", "sent_at"),
        Index(
            "ix_booking_offers_open_expires_at",
            "expires_at",
            sqlite_where=text("response IS NULL"),
            postgresql_where=text("response IS NULL"),
        ),
    )


class MatchingMetrics(Base):
    """One row per search (seed 000 §1.3)."""

    __tablename__ = "matching_metrics"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    booking_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("bookings.id", ondelete="CASCADE"), unique=True
    )
    total_drivers_notified: Mapped[int] = mapped_column(Integer)
    total_drivers_responded: Mapped[int] = mapped_column(Integer, default=0)
    total_timeouts: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    accepted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    time_to_match_s: Mapped[float | None] = mapped_column(Float)
    final_status: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_matching_metrics_created_at", "created_at"),)


class MatchingSchedule(Base):
    """When one of matching's scheduled jobs (``daily_report``, ``weekly_report``) runs next: a deadline on
    a row (as the dispatcher's ``dispatcher_schedule``), claimed by the sweeper, so several instances run it
    once. ``expression`` is the cron it was planned from: a changed setting re-plans it."""

    __tablename__ = "matching_schedule"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expression: Mapped[str] = mapped_column(String(120))
