"""Shapes shared by the matching modules and their callers (seed 000 §2.2): the outbox categories of
matching's messages, the answer a driver's response gets, the configuration, and the results.

Re-exported by :mod:`dispatchd.matching.service`, where callers have always imported them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dispatchd.matching import messages
from dispatchd.matching.models import Booking, PriorityMode


class Category(StrEnum):
    """Outbox ``category`` of each message matching writes (it picks the retry policy and priority)."""

    DRIVER_OFFER = "driver_offer"
    OFFER_TAKEN = "offer_taken"
    OFFER_CANCELLED = "offer_cancelled"
    CUSTOMER_SEARCH_STARTED = "customer_search_started"
    CUSTOMER_SEARCH_PROGRESS = "customer_search_progress"  # seed 000 §7.1 notifySearchProgress
    CUSTOMER_DRIVER_FOUND = "customer_driver_found"
    CUSTOMER_NO_DRIVER = "customer_no_driver"
    CUSTOMER_CANCELLED = "customer_cancelled"
    CUSTOMER_REPLY = "customer_reply"  # the answer to a customer's 2 / 3 after a timeout
    DRIVER_REPLY = "driver_reply"  # the answer to a typed ACCEPTER / REFUSER that decided nothing
    ADMIN_ALERT = "admin_alert"


class Action(StrEnum):
    """Seed 000 §2.2 ResponseResult.action, plus ``OFFER_EXPIRED`` and ``DRIVER_BUSY``."""

    ASSIGNED = "ASSIGNED"
    REJECTED = "REJECTED"
    ALREADY_TAKEN = "ALREADY_TAKEN"
    BOOKING_CANCELLED = "BOOKING_CANCELLED"
    OFFER_EXPIRED = "OFFER_EXPIRED"
    DRIVER_BUSY = "DRIVER_BUSY"


@dataclass(frozen=True)
class MatchingConfig:
    """Durations in seconds; see :class:`dispatchd.config.Settings` for each."""

    offer_timeout_s: float = 30.0
    search_timeout_s: float = 300.0
    wave_retry_s: float = 10.0
    escalation_radius_factor: float = 1.5
    driver_stale_after_s: float = 900.0
    admin_phones: tuple[str, ...] = ()
    search_progress_interval_s: float = 60.0
    timezone: str = "UTC"  # IANA; the hours of the reports and of ``stats?group_by=hour``


@dataclass(frozen=True)
class MatchingOptions:
    """Seed 000 §2.2 MatchingOptions. ``max_distance_km`` (km) None = unlimited; stored with the search in
    ``bookings.search_options`` (:meth:`as_json`) so that later waves and a relaunch reuse them."""

    max_distance_km: float | None = None
    exclude_driver_ids: tuple[str, ...] = ()
    priority_mode: PriorityMode = PriorityMode.RECENT_ACTIVITY

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority_mode", PriorityMode(self.priority_mode))
        object.__setattr__(self, "exclude_driver_ids", tuple(self.exclude_driver_ids))

    def as_json(self) -> dict[str, Any]:
        return {
            "max_distance_km": self.max_distance_km,
            "exclude_driver_ids": list(self.exclude_driver_ids),
            "priority_mode": self.priority_mode.value,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> MatchingOptions:
        """The options :meth:`as_json` stored (None or ``{}``: the defaults)."""
        data = data or {}
        return cls(
            max_distance_km=data.get("max_distance_km"),
            exclude_driver_ids=tuple(data.get("exclude_driver_ids") or ()),
            priority_mode=PriorityMode(data.get("priority_mode") or PriorityMode.RECENT_ACTIVITY),
        )


@dataclass
class MatchingResult:
    """Seed 000 §2.2 MatchingResult."""

    success: bool
    drivers_notified: int
    driver_ids: list[str]
    matching_metrics_id: str
    booking: Booking
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ResponseResult:
    """Seed 000 §2.2 ResponseResult (plus ``DRIVER_BUSY``)."""

    success: bool
    action: Action
    booking_id: str
    driver_id: str

    @property
    def message(self) -> str:
        """The driver-facing text of :attr:`action` (French, :data:`messages.ACTION_MESSAGES`)."""
        return messages.ACTION_MESSAGES[self.action]
