"""Retry policies per message category (issue 3; seed 004 "Backoff exponentiel").

- informational: next attempt after 30 min × 2^(n-1), capped at 24 h, at most 10 attempts, ±10 % jitter;
- time-critical (driver offers, "course prise"): retries within seconds (2 s × 2^(n-1), capped at 10 s),
  and a time-to-live equal to the offer's life: a message past ``expires_at`` is EXPIRED, never sent late.

A provider's ``Retry-After`` is honoured (the next attempt is never sooner). An UNKNOWN error is retried
at most ``UNKNOWN_MAX_ATTEMPTS`` times: never forever.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum

from dispatchd.notifications.channels.base import Classification, ErrorKind
from dispatchd.notifications.models import NotificationStatus

TIME_CRITICAL_CATEGORIES = frozenset({"driver_offer", "offer_taken", "offer_cancelled"})
UNKNOWN_MAX_ATTEMPTS = 3


class Priority(IntEnum):
    """Delivery order across the outbox: a lower value is always claimed first (DESIGN.md "The outbox at
    a real peak"). Customer and admin messages are never behind driver offers."""

    ALERT = 0  # admin alerts
    NORMAL = 1  # customers, operators, a driver's own trip
    OFFER = 2  # driver offers: many, paced, short-lived
    NOTICE = 3  # "course prise" and the like: useful, never urgent


#: the category of every message to admins (matching's and the dispatcher's alerts use it too); each
#: such message is also an ``AlertRaised`` event on the ``alerts`` topic (:func:`outbox.enqueue`)
ADMIN_ALERT = "admin_alert"

CATEGORY_PRIORITIES = {
    ADMIN_ALERT: Priority.ALERT,
    "driver_offer": Priority.OFFER,
    "offer_taken": Priority.NOTICE,
    "offer_cancelled": Priority.NOTICE,
}


def priority_for(category: str) -> Priority:
    """The default priority of a category (a writer may pass another one with the message)."""
    return CATEGORY_PRIORITIES.get(category, Priority.NORMAL)


def must_deliver(priority: int) -> bool:
    """Messages that must always reach their recipient in seconds: customers' and admins'."""
    return priority <= Priority.NORMAL


@dataclass(frozen=True)
class RetryPolicy:
    name: str
    base_s: float
    cap_s: float
    max_attempts: int
    jitter: float

    def delay_s(self, attempts: int, rng: random.Random) -> float:
        """Seconds before attempt ``attempts + 1``: ``base × 2^(attempts-1)``, capped, with jitter."""
        delay = min(self.cap_s, self.base_s * 2 ** max(0, attempts - 1))
        return delay * (1 + rng.uniform(-self.jitter, self.jitter))


INFORMATIONAL = RetryPolicy("informational", base_s=1800.0, cap_s=86_400.0, max_attempts=10, jitter=0.1)
TIME_CRITICAL = RetryPolicy("time_critical", base_s=2.0, cap_s=10.0, max_attempts=10, jitter=0.2)


def policy_for(category: str) -> RetryPolicy:
    return TIME_CRITICAL if category in TIME_CRITICAL_CATEGORIES else INFORMATIONAL


@dataclass(frozen=True)
class Decision:
    """What to do with a message after a failed attempt."""

    status: NotificationStatus
    next_attempt_at: datetime | None


def after_failure(
    category: str,
    attempts: int,
    classification: Classification,
    now: datetime,
    expires_at: datetime | None,
    rng: random.Random,
) -> Decision:
    """The status and next attempt after failure number ``attempts`` (kinds other than TEMPORARY and
    UNKNOWN end the message here; WINDOW_CLOSED is handled by the caller before)."""
    policy = policy_for(category)
    limit = UNKNOWN_MAX_ATTEMPTS if classification.kind is ErrorKind.UNKNOWN else policy.max_attempts
    if classification.kind not in (ErrorKind.TEMPORARY, ErrorKind.UNKNOWN) or attempts >= limit:
        return Decision(NotificationStatus.FAILED_PERMANENT, None)
    wait = max(policy.delay_s(attempts, rng), classification.retry_after_s or 0.0)
    next_at = now + timedelta(seconds=wait)
    if expires_at is not None and next_at >= expires_at:
        return Decision(NotificationStatus.EXPIRED, None)
    return Decision(NotificationStatus.FAILED, next_at)
