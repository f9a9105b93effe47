"""Matching statistics (seed 000 §6): rates and times over a time range, per-driver response stats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select

from dispatchd.core.db import Database
from dispatchd.core.stats import percentile
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus, FinalStatus, MatchingMetrics


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


async def matching_stats(db: Database, start: datetime, end: datetime) -> dict[str, Any]:
    """Searches started in ``[start, end)`` (UTC): counts, rates, time to match (s) and per-driver stats.

    ``acceptance_rate`` = matched / finished searches, ``timeout_rate`` = timed out / finished.
    Per driver, over offers sent in the range: offers received, answers given, share of answers that
    were ACCEPT, mean server-measured response time (s), offers left to time out.
    """
    async with db.read() as session:
        active = await session.scalar(
            select(func.count()).select_from(Booking).where(Booking.status == BookingStatus.SEARCHING.value)
        )
        rows = (
            await session.execute(
                select(MatchingMetrics.final_status, MatchingMetrics.time_to_match_s).where(
                    MatchingMetrics.created_at >= start, MatchingMetrics.created_at < end
                )
            )
        ).all()
        per_driver = (
            await session.execute(
                select(
                    BookingOffer.driver_id,
                    func.count(),
                    func.count(BookingOffer.responded_at),
                    func.sum(case((BookingOffer.driver_answer == "ACCEPT", 1), else_=0)),
                    func.avg(BookingOffer.response_time_ms),
                    func.sum(case((BookingOffer.response == "TIMEOUT", 1), else_=0)),
                )
                .where(BookingOffer.sent_at >= start, BookingOffer.sent_at < end)
                .group_by(BookingOffer.driver_id)
                .order_by(BookingOffer.driver_id)
            )
        ).all()
    finals = [status for status, _ in rows]
    matched = finals.count(FinalStatus.MATCHED.value)
    timed_out = finals.count(FinalStatus.TIMEOUT.value)
    cancelled = finals.count(FinalStatus.CANCELLED.value)
    finished = matched + timed_out + cancelled
    times = [t for status, t in rows if status == FinalStatus.MATCHED.value and t is not None]
    return {
        "from": start,
        "to": end,
        "active_matchings": int(active or 0),
        "searches": len(rows),
        "matched": matched,
        "timed_out": timed_out,
        "cancelled": cancelled,
        "time_to_match_s": {
            "mean": round(sum(times) / len(times), 3) if times else None,
            "p50": percentile(times, 50),
            "p95": percentile(times, 95),
        },
        "acceptance_rate": _ratio(matched, finished),
        "timeout_rate": _ratio(timed_out, finished),
        "drivers": [
            {
                "driver_id": driver_id,
                "notifications_received": int(received),
                "responses": int(responses),
                "acceptance_rate": _ratio(int(accepts or 0), int(responses)),
                "mean_response_time_s": round(float(mean_ms) / 1000, 3) if mean_ms is not None else None,
                "timeouts": int(timeouts or 0),
            }
            for driver_id, received, responses, accepts, mean_ms, timeouts in per_driver
        ],
    }
