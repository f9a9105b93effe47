"""Matching's component of ``/v1/health`` (seed 000 "Health checks"): searches in progress and the
timeout rate over the last hour (at least 5 finished searches), 20 % WARNING / 50 % CRITICAL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from dispatchd.core.db import Database
from dispatchd.core.health import grade
from dispatchd.core.wiring import HealthContribution
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus, FinalStatus, MatchingMetrics


async def matching_health(db: Database) -> HealthContribution:
    """``({"status", "active_matchings", "finished_last_hour", "timeout_rate_last_hour"},
    {"active_matchings", "avg_response_time_s", "error_rate"})``."""
    hour_ago = db.clock.now() - timedelta(hours=1)
    async with db.read() as session:
        active = await session.scalar(
            select(func.count()).select_from(Booking).where(Booking.status == BookingStatus.SEARCHING.value)
        )
        finals = dict(
            (
                await session.execute(
                    select(MatchingMetrics.final_status, func.count())
                    .where(MatchingMetrics.created_at >= hour_ago, MatchingMetrics.final_status.is_not(None))
                    .group_by(MatchingMetrics.final_status)
                )
            ).all()
        )
        mean_response_ms = await session.scalar(
            select(func.avg(BookingOffer.response_time_ms)).where(BookingOffer.responded_at >= hour_ago)
        )
    finished = sum(finals.values())
    timeout_rate = finals.get(FinalStatus.TIMEOUT.value, 0) / finished if finished else None
    component = {
        "status": grade(timeout_rate if finished >= 5 else None, 0.2, 0.5),
        "active_matchings": int(active or 0),
        "finished_last_hour": finished,
        "timeout_rate_last_hour": None if timeout_rate is None else round(timeout_rate, 4),
    }
    summary = {
        "active_matchings": int(active or 0),
        "avg_response_time_s": None if mean_response_ms is None else round(float(mean_response_ms) / 1000, 3),
        "error_rate": None if timeout_rate is None else round(timeout_rate, 4),
    }
    return component, summary
