"""Matching's admin alert rules, run by the notifications domain's 60 s monitor (seed 000 §5
``AdminAlertService.alertLowDriverAvailability`` and ``alertSystemError``; "Monitoring: alertes
automatiques si dysfonctionnement").

- ``LOW_DRIVER_AVAILABILITY`` (warning): searches are running and fewer than ``low_drivers_threshold``
  (``DISPATCHD_LOW_DRIVERS_THRESHOLD``, 3; 0 = off) drivers are available — AVAILABLE, no active booking,
  seen within ``driver_stale_after_s`` (the drivers a wave could reach). There are no zones yet: the
  count is for the whole fleet.
- ``SEARCH_TIMEOUT_RATE`` (critical): at least ``timeout_rate_alert`` (``DISPATCHD_TIMEOUT_RATE_ALERT``,
  0.5) of the searches started in the last hour and finished ended in TIMEOUT, with at least
  ``timeout_rate_min_searches`` (5) finished (the same window as ``/v1/health``'s matching component).

Registered through ``Domain.alert_rules`` (:func:`rules`), so that notifications imports nothing of
matching.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.config import Settings
from dispatchd.core.wiring import AlertRule
from dispatchd.matching.models import (
    Booking,
    BookingStatus,
    Driver,
    DriverStatus,
    FinalStatus,
    MatchingMetrics,
)
from dispatchd.notifications.alerts import Alert, Severity

ACTIONS = (
    "`GET /v1/drivers?status=AVAILABLE` : chauffeurs hors ligne, sans battement de cœur, ou bloqués sur une "
    "course jamais terminée",
    "`GET /v1/matching/stats` : taux de timeout et temps de réponse",
)


async def available_drivers(session: AsyncSession, now: datetime, stale_after_s: float) -> int:
    """Drivers a wave could offer a search to: AVAILABLE, without an active booking, seen within
    ``stale_after_s`` seconds of ``now`` (0 = no limit)."""
    query = select(func.count()).where(
        Driver.status == DriverStatus.AVAILABLE.value, Driver.current_booking_id.is_(None)
    )
    if stale_after_s > 0:
        query = query.where(Driver.last_seen_at >= now - timedelta(seconds=stale_after_s))
    return int(await session.scalar(query) or 0)


def rules(settings: Settings) -> tuple[AlertRule, ...]:
    """The two rules with their thresholds from ``settings``."""
    threshold = settings.low_drivers_threshold
    stale_after_s = settings.driver_stale_after_s
    rate_bound, min_searches = settings.timeout_rate_alert, settings.timeout_rate_min_searches

    async def low_driver_availability(session: AsyncSession, now: datetime) -> list[Alert]:
        if threshold <= 0:
            return []
        searching = int(
            await session.scalar(select(func.count()).where(Booking.status == BookingStatus.SEARCHING.value))
            or 0
        )
        if not searching:
            return []
        available = await available_drivers(session, now, stale_after_s)
        if available >= threshold:
            return []
        return [
            Alert(
                "LOW_DRIVER_AVAILABILITY",
                Severity.WARNING,
                f"{available} chauffeur(s) disponible(s) (seuil {threshold}) pendant {searching} "
                "recherche(s) en cours, toutes zones",
                area="Matching",
                actions=ACTIONS,
            )
        ]

    async def search_timeout_rate(session: AsyncSession, now: datetime) -> list[Alert]:
        finals = dict(
            (
                await session.execute(
                    select(MatchingMetrics.final_status, func.count())
                    .where(
                        MatchingMetrics.created_at >= now - timedelta(hours=1),
                        MatchingMetrics.final_status.is_not(None),
                    )
                    .group_by(MatchingMetrics.final_status)
                )
            ).all()
        )
        finished = sum(finals.values())
        timeouts = finals.get(FinalStatus.TIMEOUT.value, 0)
        if finished < min_searches or timeouts / finished < rate_bound:
            return []
        return [
            Alert(
                "SEARCH_TIMEOUT_RATE",
                Severity.CRITICAL,
                f"{timeouts} recherche(s) sur {finished} terminées en timeout dans la dernière heure "
                f"({timeouts / finished:.0%}, seuil {rate_bound:.0%})",
                area="Matching",
                actions=ACTIONS,
            )
        ]

    return (low_driver_availability, search_timeout_rate)
