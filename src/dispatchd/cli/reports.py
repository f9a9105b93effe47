"""``dispatchd reports daily|weekly [--date] [--csv]``: the admins' matching report, printed (seed 000 §5.1
sendDailyMetricsReport, §6.1 generateDailyReport / generateWeeklyReport)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated
from zoneinfo import ZoneInfo

import typer

from dispatchd.cli.common import console, errors, settings, with_db

app = typer.Typer(help="Matching reports by zone and hour (seed 000 §6).", no_args_is_help=True)

DateOption = Annotated[
    str | None,
    typer.Option(
        "--date",
        help="First local day (YYYY-MM-DD) in DISPATCHD_TIMEZONE; default: yesterday (daily), the 7 days "
        "before today (weekly)",
    ),
]
CsvOption = Annotated[bool, typer.Option("--csv", help="Print the CSV the email attaches instead")]


def _print(kind: str, day: str | None, as_csv: bool) -> None:
    from dispatchd.matching import reports
    from dispatchd.matching.zones import load_zones

    config = settings()
    try:
        first_day = date.fromisoformat(day) if day else None
    except ValueError:
        errors.print(f"--date must be YYYY-MM-DD, not {day!r}")
        raise typer.Exit(2) from None
    try:
        zones = load_zones(config.zones_geojson, config.zone_geohash_precision)
    except ValueError as exc:
        errors.print(f"DISPATCHD_ZONES_GEOJSON: {exc}")
        raise typer.Exit(2) from None
    if first_day is None:
        first_day = reports.default_day(kind, datetime.now(ZoneInfo(config.timezone)).date())
    report = with_db(lambda db: reports.build_report(db, zones, config.timezone, kind, first_day), config)
    if as_csv:
        print(reports.render_csv(report), end="")
    else:
        console.print(reports.render_text(report), markup=False, highlight=False)


@app.command("daily")
def reports_daily(day: DateOption = None, as_csv: CsvOption = False) -> None:
    """The searches of one local day: totals, peak hours, busiest zones."""
    _print("daily", day, as_csv)


@app.command("weekly")
def reports_weekly(day: DateOption = None, as_csv: CsvOption = False) -> None:
    """The searches of 7 local days from --date."""
    _print("weekly", day, as_csv)
