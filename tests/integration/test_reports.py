"""Seed 000 §5.1 / §6.1 reports: metrics by zone and by local hour, peak hours, ``GET /v1/matching/stats
?group_by=``, ``dispatchd reports daily|weekly``, and the scheduled report to the admins (WhatsApp summary,
email with the CSV attached). SQLite and PostgreSQL, clock moved by hand (starts 2026-01-05 08:00 UTC,
09:00 in Paris)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from dispatchd.cli import app as cli
from dispatchd.matching.zones import load_zones
from dispatchd.notifications.channels.base import OutboundMessage
from dispatchd.notifications.channels.smtp import build_email
from dispatchd.notifications.models import Notification
from tests.conftest import make_settings
from tests.factories import create_booking, create_driver

PLATEAU = (14.6681, -17.4312)  # inside the "Plateau" polygon
ELSEWHERE = (14.7500, -17.3500)  # outside: its geohash cell of 5
ELSEWHERE_CELL = "edeev"
PLATEAU_CELL_7 = "edee7q4"  # pygeohash.encode(14.6681, -17.4312, precision=7)


@pytest.fixture
def zones_file(tmp_path):
    path = tmp_path / "zones.geojson"
    square = [[-17.45, 14.65], [-17.41, 14.65], [-17.41, 14.69], [-17.45, 14.69], [-17.45, 14.65]]
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {"name": "Plateau"},
                        "geometry": {"type": "Polygon", "coordinates": [square]},
                    }
                ],
            }
        )
    )
    return path


@pytest.fixture
def settings(db_url, zones_file):
    return make_settings(
        db_url,
        timezone="Europe/Paris",
        zones_geojson=str(zones_file),
        report_daily_schedule="0 7 * * *",
        admin_emails=["ops@example.com"],
        smtp_url="smtp://127.0.0.1:2525",
    )


async def _three_searches(services, clock) -> None:
    """09h Paris: a search in the Plateau matched in 12 s. 11h: one elsewhere cancelled, one in the
    Plateau timed out (the only driver is busy)."""
    matching = services.matching
    driver = await create_driver(services, lat=PLATEAU[0], lon=PLATEAU[1])
    matched = await create_booking(services, pickup_lat=PLATEAU[0], pickup_lon=PLATEAU[1])
    await matching.start_matching(matched.id)
    clock.advance(12)
    await matching.respond(matched.id, driver.id, "ACCEPT")
    clock.advance(2 * 3600)
    cancelled = await create_booking(services, pickup_lat=ELSEWHERE[0], pickup_lon=ELSEWHERE[1])
    await matching.start_matching(cancelled.id)
    await matching.cancel(cancelled.id, "changed plans")
    timed_out = await create_booking(services, pickup_lat=PLATEAU[0], pickup_lon=PLATEAU[1])
    await matching.start_matching(timed_out.id)
    clock.advance(300)
    await services.sweeper.run_once()
    assert (await matching.get_booking(timed_out.id)).status == "TIMEOUT"


async def test_stats_grouped_by_zone_and_by_local_hour(services, client, clock):
    await _three_searches(services, clock)
    window = {"from": "2026-01-05T00:00:00Z", "to": "2026-01-06T00:00:00Z"}

    by_zone = await client.get("/v1/matching/stats", params={**window, "group_by": "zone"})
    assert by_zone.status_code == 200, by_zone.text
    body = by_zone.json()
    assert (body["searches"], body["group_by"], body["timezone"]) == (3, "zone", "Europe/Paris")
    groups = {g["key"]: g for g in body["groups"]}
    assert list(groups) == ["Plateau", ELSEWHERE_CELL]  # busiest first
    plateau = groups["Plateau"]
    assert (plateau["searches"], plateau["matched"], plateau["timed_out"]) == (2, 1, 1)
    assert (plateau["acceptance_rate"], plateau["timeout_rate"], plateau["mean_time_to_match_s"]) == (
        0.5,
        0.5,
        12.0,
    )
    assert plateau["peak_hours"] == [9, 11]  # one search each: the earlier hour first
    assert (groups[ELSEWHERE_CELL]["cancelled"], groups[ELSEWHERE_CELL]["peak_hours"]) == (1, [11])

    by_hour = (await client.get("/v1/matching/stats", params={**window, "group_by": "hour"})).json()
    hours = by_hour["groups"]
    assert [g["key"] for g in hours] == list(range(24))
    assert [(g["key"], g["searches"]) for g in hours if g["searches"]] == [(9, 1), (11, 2)]  # Paris, not UTC

    plain = (await client.get("/v1/matching/stats", params=window)).json()
    assert "groups" not in plain
    wrong = await client.get("/v1/matching/stats", params={**window, "group_by": "city"})
    assert wrong.status_code == 422


async def test_cli_prints_the_daily_and_weekly_reports(services, settings, clock):
    await _three_searches(services, clock)
    runner = CliRunner()
    env = {
        "DISPATCHD_DATABASE_URL": settings.database_url,
        "DISPATCHD_TIMEZONE": "Europe/Paris",
        "DISPATCHD_ZONES_GEOJSON": settings.zones_geojson,
    }

    daily = await asyncio.to_thread(runner.invoke, cli, ["reports", "daily", "--date", "2026-01-05"], env=env)
    assert daily.exit_code == 0, daily.output
    assert "RAPPORT QUOTIDIEN" in daily.output and "05/01/2026 (Europe/Paris)" in daily.output
    assert "Recherches: 3" in daily.output and "Attribuées: 1 (33 %)" in daily.output
    assert "Heures de pointe: 11h, 09h" in daily.output
    assert "- Plateau: 2 recherches, 50 % sans chauffeur" in daily.output

    before = await asyncio.to_thread(
        runner.invoke, cli, ["reports", "daily", "--date", "2026-01-04"], env=env
    )
    assert "Recherches: 0" in before.output

    weekly = await asyncio.to_thread(
        runner.invoke, cli, ["reports", "weekly", "--date", "2026-01-01", "--csv"], env=env
    )
    assert weekly.exit_code == 0, weekly.output
    rows = list(csv.DictReader(io.StringIO(weekly.output)))
    assert rows[0]["group_by"] == "total" and rows[0]["searches"] == "3" and rows[0]["peak_hours"] == "11 9"
    assert {r["key"]: r["searches"] for r in rows if r["group_by"] == "zone"} == {
        "Plateau": "2",
        ELSEWHERE_CELL: "1",
    }

    bad = await asyncio.to_thread(runner.invoke, cli, ["reports", "daily", "--date", "05/01"], env=env)
    assert bad.exit_code == 2


async def test_the_daily_report_goes_to_the_admins_at_7_in_their_time_zone(services, clock):
    await _three_searches(services, clock)  # now 2026-01-05 10:05 UTC

    async def reports() -> list[Notification]:
        async with services.db.read() as session:
            rows = await session.scalars(
                select(Notification)
                .where(Notification.category == "admin_report")
                .order_by(Notification.recipient)
            )
            return list(rows.all())

    clock.advance((datetime(2026, 1, 6, 5, 59, tzinfo=UTC) - clock.now()).total_seconds())  # 06:59 Paris
    await services.sweeper.run_once()
    assert await reports() == []
    clock.advance(60)  # 07:00 Paris
    handled = await services.sweeper.run_once()
    assert handled["matching_reports"] == 1

    phone, email = await reports()
    assert (phone.recipient, email.recipient) == ("+33600000000", "ops@example.com")
    assert "RAPPORT QUOTIDIEN" in phone.body and "05/01/2026" in phone.body and "Recherches: 3" in phone.body
    assert phone.payload is None and email.body == phone.body
    [attachment] = email.payload["attachments"]
    assert attachment["filename"] == "dispatchd-daily-2026-01-05.csv"
    assert attachment["content"].startswith("group_by,key,searches")

    clock.advance(3600)  # the same day again: nothing more
    await services.sweeper.run_once()
    assert len(await reports()) == 2
    clock.advance(86_400)  # the next morning: the next report
    await services.sweeper.run_once()
    assert len(await reports()) == 4


def test_an_email_carries_its_attachments():
    message = OutboundMessage(
        "ntf_1",
        "ops@example.com",
        "admin_report",
        "📊 *RAPPORT QUOTIDIEN*\nRecherches: 3",
        {"attachments": [{"filename": "r.csv", "content_type": "text/csv", "content": "a,b\n1,2\n"}]},
    )
    email = build_email(message, "dispatchd@example.com")
    assert email["Subject"] == "📊 RAPPORT QUOTIDIEN"
    assert email.get_body(("plain",)).get_content().startswith("📊 *RAPPORT QUOTIDIEN*")
    [attachment] = list(email.iter_attachments())
    assert (attachment.get_filename(), attachment.get_content_type()) == ("r.csv", "text/csv")
    assert attachment.get_payload(decode=True) == b"a,b\n1,2\n"


def test_zones_file_errors_name_the_feature(tmp_path):
    path = tmp_path / "bad.geojson"
    path.write_text(
        json.dumps({"type": "FeatureCollection", "features": [{"properties": {}, "geometry": {}}]})
    )
    with pytest.raises(ValueError, match="feature 0 has no properties.name"):
        load_zones(path)
    cells = load_zones(None, 7)
    assert cells.zone_of(*PLATEAU) == PLATEAU_CELL_7 and cells.zone_of(None, -17.4) is None
