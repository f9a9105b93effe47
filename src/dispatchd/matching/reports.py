"""Matching metrics by zone and by hour, peak hours, and the admins' daily and weekly reports (seed 000
§5.1 sendDailyMetricsReport, §6.1 getMetricsByZone, getMetricsByHour, generateDailyReport,
generateWeeklyReport).

A search counts where and when it started: its zone is its pickup's (:mod:`dispatchd.matching.zones`),
its hour the hour (0–23) of ``matching_metrics.started_at`` in ``DISPATCHD_TIMEZONE``. Rates are over
finished searches (matched + timed out + cancelled); times in seconds.

:class:`ReportScheduler` sends them: at each time of ``DISPATCHD_REPORT_DAILY_SCHEDULE`` /
``DISPATCHD_REPORT_WEEKLY_SCHEDULE`` (cron, in ``DISPATCHD_TIMEZONE``), a WhatsApp summary to each admin
phone and an email with the CSV attached to each admin email, through the outbox.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import Database, retry_transient
from dispatchd.core.logging import get_logger
from dispatchd.core.stats import percentile
from dispatchd.core.sweeper import Deadline
from dispatchd.matching.models import Booking, FinalStatus, MatchingMetrics, MatchingSchedule
from dispatchd.matching.zones import UNKNOWN_ZONE, Zones
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Message

log = get_logger("dispatchd.matching")

GroupBy = Literal["hour", "zone"]
Kind = Literal["daily", "weekly"]
#: How many peak hours a group lists (seed 000 §6.1 ZoneMetrics.peakHours).
PEAK_HOURS_MAX = 3
#: Zones a WhatsApp summary names (the busiest; the CSV has them all).
SUMMARY_ZONES_MAX = 5
CSV_COLUMNS = (
    "group_by",
    "key",
    "searches",
    "matched",
    "timed_out",
    "cancelled",
    "acceptance_rate",
    "timeout_rate",
    "mean_time_to_match_s",
    "peak_hours",
)


@dataclass(frozen=True)
class Search:
    """One search of the range: its local start hour (0–23), zone (None: no pickup position), final
    status (None while running) and time to match (s)."""

    hour: int
    zone: str | None
    final_status: str | None
    time_to_match_s: float | None


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def peak_hours(searches: list[Search]) -> list[int]:
    """The local hours (0–23) with the most searches, busiest first (ties: the earlier hour), at most
    :data:`PEAK_HOURS_MAX`; empty when there is no search."""
    counts: dict[int, int] = {}
    for search in searches:
        counts[search.hour] = counts.get(search.hour, 0) + 1
    return [hour for hour, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))][:PEAK_HOURS_MAX]


def summarise(searches: list[Search]) -> dict[str, Any]:
    """Seed 000 §6.1 ZoneMetrics / HourMetrics of some searches: ``searches`` (totalBookings), ``matched``
    (successfulMatches), ``timed_out``, ``cancelled``, ``acceptance_rate`` and ``timeout_rate`` (0–1 over
    finished searches, None when none finished), ``mean_time_to_match_s`` (averageMatchingTime, s) and
    ``p95_time_to_match_s``, ``peak_hours``."""
    finals = [s.final_status for s in searches]
    matched = finals.count(FinalStatus.MATCHED.value)
    timed_out = finals.count(FinalStatus.TIMEOUT.value)
    cancelled = finals.count(FinalStatus.CANCELLED.value)
    finished = matched + timed_out + cancelled
    times = [s.time_to_match_s for s in searches if s.final_status == FinalStatus.MATCHED.value]
    times = [t for t in times if t is not None]
    return {
        "searches": len(searches),
        "matched": matched,
        "timed_out": timed_out,
        "cancelled": cancelled,
        "acceptance_rate": _ratio(matched, finished),
        "timeout_rate": _ratio(timed_out, finished),
        "mean_time_to_match_s": round(sum(times) / len(times), 3) if times else None,
        "p95_time_to_match_s": percentile(times, 95),
        "peak_hours": peak_hours(searches),
    }


async def searches_between(
    session: AsyncSession, zones: Zones, timezone: str, start: datetime, end: datetime
) -> list[Search]:
    """Searches started in ``[start, end)`` (UTC), with their local hour in ``timezone`` and zone."""
    zone = ZoneInfo(timezone)
    rows = (
        await session.execute(
            select(
                MatchingMetrics.started_at,
                MatchingMetrics.final_status,
                MatchingMetrics.time_to_match_s,
                Booking.pickup_lat,
                Booking.pickup_lon,
            )
            .join(Booking, Booking.id == MatchingMetrics.booking_id)
            .where(MatchingMetrics.started_at >= start, MatchingMetrics.started_at < end)
            .order_by(MatchingMetrics.started_at, MatchingMetrics.id)
        )
    ).all()
    return [
        Search(started_at.astimezone(zone).hour, zones.zone_of(lat, lon), final, time_to_match)
        for started_at, final, time_to_match, lat, lon in rows
    ]


def grouped(searches: list[Search], group_by: GroupBy) -> list[dict[str, Any]]:
    """:func:`summarise` per group, each with its ``key``: per local hour (0–23, every hour, in order) or
    per zone (busiest first, then by name; searches without a pickup under ``"unknown"``)."""
    if group_by == "hour":
        return [{"key": hour, **summarise([s for s in searches if s.hour == hour])} for hour in range(24)]
    by_zone: dict[str, list[Search]] = {}
    for search in searches:
        by_zone.setdefault(search.zone or UNKNOWN_ZONE, []).append(search)
    ordered = sorted(by_zone.items(), key=lambda item: (-len(item[1]), item[0]))
    return [{"key": key, **summarise(members)} for key, members in ordered]


async def stats_by(
    db: Database, zones: Zones, timezone: str, start: datetime, end: datetime, group_by: GroupBy
) -> list[dict[str, Any]]:
    """``GET /v1/matching/stats?group_by=`` groups: :func:`grouped` over searches started in
    ``[start, end)`` (UTC)."""
    async with db.read() as session:
        searches = await searches_between(session, zones, timezone, start, end)
    return grouped(searches, group_by)


# ------------------------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class Report:
    """A daily or weekly report: the local days ``[first_day, last_day]`` in ``timezone``, their UTC
    bounds ``[start, end)``, the totals (:func:`summarise`), and the groups by zone and by hour."""

    kind: Kind
    timezone: str
    first_day: date
    last_day: date
    start: datetime
    end: datetime
    totals: dict[str, Any]
    by_zone: list[dict[str, Any]]
    by_hour: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "timezone": self.timezone,
            "first_day": self.first_day.isoformat(),
            "last_day": self.last_day.isoformat(),
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "totals": self.totals,
            "by_zone": self.by_zone,
            "by_hour": self.by_hour,
        }


def default_day(kind: Kind, today: date) -> date:
    """The first day a report covers when none is given: yesterday (daily), the 7 days before today
    (weekly)."""
    return today - timedelta(days=1 if kind == "daily" else 7)


def local_bounds(first_day: date, days: int, timezone: str) -> tuple[datetime, datetime]:
    """UTC bounds of ``days`` local days from ``first_day`` 00:00 in ``timezone`` (DST-safe)."""
    zone = ZoneInfo(timezone)
    start = datetime.combine(first_day, time(0), zone)
    end = datetime.combine(first_day + timedelta(days=days), time(0), zone)
    return start.astimezone(ZoneInfo("UTC")), end.astimezone(ZoneInfo("UTC"))


async def build_report(db: Database, zones: Zones, timezone: str, kind: Kind, first_day: date) -> Report:
    """Seed 000 §6.1 generateDailyReport(date) / generateWeeklyReport(startDate): the searches started on
    the local day ``first_day`` (daily) or the 7 local days from it (weekly), in ``timezone``."""
    async with db.read() as session:
        return await report_in(session, zones, timezone, kind, first_day)


async def report_in(
    session: AsyncSession, zones: Zones, timezone: str, kind: Kind, first_day: date
) -> Report:
    """:func:`build_report` in the caller's unit of work."""
    days = 1 if kind == "daily" else 7
    start, end = local_bounds(first_day, days, timezone)
    searches = await searches_between(session, zones, timezone, start, end)
    return Report(
        kind=kind,
        timezone=timezone,
        first_day=first_day,
        last_day=first_day + timedelta(days=days - 1),
        start=start,
        end=end,
        totals=summarise(searches),
        by_zone=grouped(searches, "zone"),
        by_hour=grouped(searches, "hour"),
    )


def _percent(value: float | None) -> str:
    return f"{value * 100:.0f} %" if value is not None else "-"


def _seconds(value: float | None) -> str:
    return f"{value:.0f} s" if value is not None else "-"


def _hours(hours: list[int]) -> str:
    return ", ".join(f"{hour:02d}h" for hour in hours) or "-"


def render_text(report: Report) -> str:
    """The WhatsApp summary (French, the admins' language): totals, peak hours, the busiest zones."""
    totals = report.totals
    if report.kind == "daily":
        title, period = "RAPPORT QUOTIDIEN", report.first_day.strftime("%d/%m/%Y")
    else:
        title = "RAPPORT HEBDOMADAIRE"
        period = f"{report.first_day.strftime('%d/%m/%Y')} → {report.last_day.strftime('%d/%m/%Y')}"
    lines = [
        f"📊 *{title}*",
        f"{period} ({report.timezone})",
        "",
        f"🔍 Recherches: {totals['searches']}",
        f"✅ Attribuées: {totals['matched']} ({_percent(totals['acceptance_rate'])})",
        f"⏱️ Sans chauffeur: {totals['timed_out']} ({_percent(totals['timeout_rate'])})",
        f"🚫 Annulées: {totals['cancelled']}",
        f"⚡ Temps moyen d'attribution: {_seconds(totals['mean_time_to_match_s'])}",
        f"📈 Heures de pointe: {_hours(totals['peak_hours'])}",
    ]
    zones = [z for z in report.by_zone if z["searches"]][:SUMMARY_ZONES_MAX]
    if zones:
        lines += ["", "📍 *Zones les plus demandées:*"]
        lines += [
            f"- {z['key']}: {z['searches']} recherches, {_percent(z['timeout_rate'])} sans chauffeur"
            for z in zones
        ]
    return "\n".join(lines)


def render_csv(report: Report) -> str:
    """The report as CSV (:data:`CSV_COLUMNS`): one ``total`` row, then one row per zone and per hour;
    ``peak_hours`` space-separated. Zone names from the GeoJSON are neutralised against spreadsheet
    formulas (OWASP "CSV Injection": a leading ``= + - @``, tab or CR gets a ``'``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def row(group_by: str, key: Any, values: dict[str, Any]) -> list[Any]:
        key = str(key)
        if key[:1] in ("=", "+", "-", "@", "\t", "\r"):
            key = "'" + key
        cells = [values[name] for name in CSV_COLUMNS[2:-1]]
        cells = ["" if cell is None else cell for cell in cells]
        return [group_by, key, *cells, " ".join(str(hour) for hour in values["peak_hours"])]

    writer.writerow(row("total", "", report.totals))
    for group in report.by_zone:
        writer.writerow(row("zone", group["key"], group))
    for group in report.by_hour:
        writer.writerow(row("hour", group["key"], group))
    return out.getvalue()


# --------------------------------------------------------------------------------- scheduled sending

#: Outbox category of the reports (informational: retried over hours, never an ``AlertRaised``).
ADMIN_REPORT = "admin_report"
#: A report not delivered within this long is dropped: the next one is on its way.
REPORT_TTL = timedelta(hours=24)
JOBS: tuple[tuple[str, Kind], ...] = (("daily_report", "daily"), ("weekly_report", "weekly"))


@dataclass(frozen=True)
class ReportConfig:
    """The cron of each report (None: never), read in ``timezone`` (IANA); who receives them: each admin
    phone a WhatsApp summary, each admin email the summary with the CSV attached (no admin at all: the
    ``"admin"`` recipient, logged)."""

    daily_schedule: str | None = None
    weekly_schedule: str | None = None
    timezone: str = "UTC"
    admin_phones: tuple[str, ...] = ()
    admin_emails: tuple[str, ...] = ()

    def schedule(self, kind: Kind) -> str | None:
        return self.daily_schedule if kind == "daily" else self.weekly_schedule


def next_run(expression: str, timezone: str, after: datetime) -> datetime:
    """The first time of the cron ``expression`` (read in ``timezone``) strictly after ``after`` (UTC)."""
    local = croniter(expression, after.astimezone(ZoneInfo(timezone))).get_next(datetime)
    return local.astimezone(after.tzinfo)


def report_messages(report: Report, config: ReportConfig) -> list[Message]:
    """The messages of one report: the summary to each admin phone; the summary and the CSV
    (``payload["attachments"]``, see :mod:`dispatchd.notifications.channels.smtp`) to each admin email."""
    text = render_text(report)
    subject = f"report:{report.kind}:{report.first_day.isoformat()}"
    filename = f"dispatchd-{report.kind}-{report.first_day.isoformat()}.csv"
    attachment = {"filename": filename, "content_type": "text/csv", "content": render_csv(report)}
    phones = config.admin_phones or (() if config.admin_emails else ("admin",))
    return [
        *(Message(recipient=phone, category=ADMIN_REPORT, body=text, subject=subject) for phone in phones),
        *(
            Message(
                recipient=email,
                category=ADMIN_REPORT,
                body=text,
                subject=subject,
                payload={"attachments": [attachment]},
            )
            for email in config.admin_emails
        ),
    ]


class ReportScheduler:
    """Seed 000 §5.1 sendDailyMetricsReport, and its weekly twin: at each time of a report's cron, the
    report of the day before (daily) or of the 7 days before (weekly), in ``timezone``, is written to the
    outbox for the admins, once across instances (a deadline on a ``matching_schedule`` row)."""

    def __init__(self, zones: Zones, config: ReportConfig) -> None:
        self.zones = zones
        self.config = config

    async def send_report(self, session: AsyncSession, kind: Kind, first_day: date) -> Report:
        """Write one report's messages in the caller's unit of work; return the report."""
        report = await report_in(session, self.zones, self.config.timezone, kind, first_day)
        messages = report_messages(report, self.config)
        expires_at = session.info["now"] + REPORT_TTL
        await outbox.enqueue(session, [replace(m, expires_at=expires_at) for m in messages])
        log.info("report sent", kind=kind, first_day=first_day.isoformat(), messages=len(messages))
        return report

    @retry_transient
    async def run_due(self, db: Database, limit: int) -> int:
        """The ``matching_reports`` deadline: plan each configured report's next time, send those due;
        return how many were sent."""
        sent = 0
        for name, kind in JOBS:
            expression = self.config.schedule(kind)
            if expression is None:
                continue
            async with db.transaction() as session:
                now: datetime = session.info["now"]
                run = await session.scalar(
                    select(MatchingSchedule)
                    .where(MatchingSchedule.name == name)
                    .with_for_update(skip_locked=True)
                    .execution_options(populate_existing=True)
                )
                if run is None:
                    if await session.scalar(
                        select(MatchingSchedule.name).where(MatchingSchedule.name == name)
                    ):
                        continue  # another instance holds it
                    upcoming = next_run(expression, self.config.timezone, now)
                    try:  # two instances' first tick both find no row: one plans, the other moves on
                        async with session.begin_nested():
                            session.add(
                                MatchingSchedule(name=name, next_run_at=upcoming, expression=expression)
                            )
                    except IntegrityError:
                        pass
                    continue
                if run.expression != expression:
                    run.next_run_at, run.expression = (
                        next_run(expression, self.config.timezone, now),
                        expression,
                    )
                    continue
                if run.next_run_at > now:
                    continue
                today = run.next_run_at.astimezone(ZoneInfo(self.config.timezone)).date()
                await self.send_report(session, kind, default_day(kind, today))
                run.next_run_at = next_run(expression, self.config.timezone, now)
                sent += 1
        return sent

    async def oldest_due(self, session: AsyncSession, now: datetime) -> datetime | None:
        """When the oldest configured report due at ``now`` (UTC) fell due, or None."""
        names = [name for name, kind in JOBS if self.config.schedule(kind) is not None]
        if not names:
            return None
        return await session.scalar(
            select(func.min(MatchingSchedule.next_run_at)).where(
                MatchingSchedule.name.in_(names), MatchingSchedule.next_run_at <= now
            )
        )

    def deadline(self) -> Deadline:
        return Deadline("matching_reports", self.run_due, self.oldest_due)
