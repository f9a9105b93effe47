"""The outbox summary (issue 7): ``GET /v1/notifications/summary``, ``dispatchd notifications summary``
and the pure helpers of ``dispatchd.notifications.report``. On SQLite and PostgreSQL, on a manual clock."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import update
from typer.testing import CliRunner

from dispatchd.cli import app as cli
from dispatchd.core.db import Database
from dispatchd.notifications import outbox, report
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message
from tests.conftest import ADMIN_KEY
from tests.factories import post_driver_with_key


async def _write(db: Database, category: str, recipient: str, expires_in_s: float | None = None) -> str:
    async with db.transaction() as session:
        now = session.info["now"]
        expires_at = now + timedelta(seconds=expires_in_s) if expires_in_s is not None else None
        [notification_id] = await outbox.enqueue(
            session, [Message(recipient, category, f"{category} body", expires_at=expires_at)]
        )
        return notification_id


async def _set(db: Database, notification_id: str, **values: object) -> None:
    async with db.transaction() as session:
        await session.execute(update(Notification).where(Notification.id == notification_id).values(**values))


async def _seed(services, clock) -> datetime:
    """Rows written before and after the returned ``since``; see the expected summary in the test."""
    db = services.db
    await _write(db, "customer_driver_found", "+221770000100")  # before the window
    clock.advance(10)
    since = clock.now()
    found = [await _write(db, "customer_driver_found", f"+22177000010{n}") for n in range(1, 4)]
    alert = await _write(db, "admin_alert", "+221770000200")
    started = await _write(db, "customer_search_started", "+221770000101")
    offers = [await _write(db, "driver_offer", f"+22177000030{n}", expires_in_s=30) for n in range(3)]
    taken = await _write(db, "offer_taken", "+221770000300", expires_in_s=300)
    clock.advance(1)
    await _set(db, offers[0], status="SENT", sent_at=clock.now())
    clock.advance(1)
    await _set(db, found[0], status="SENT", sent_at=clock.now())
    clock.advance(2)
    await _set(db, found[1], status="DELIVERED", sent_at=clock.now(), delivered_at=clock.now())
    await _set(db, alert, status="FAILED_PERMANENT", failed_at=clock.now())
    await _set(db, started, status="CANCELLED")
    await _set(db, taken, status="FAILED", failed_at=clock.now())
    clock.advance(40)  # the offers' 30 s have passed
    await _set(db, offers[1], status="EXPIRED")
    # offers[2] stays PENDING past its expiry, found[2] PENDING, taken FAILED before its expiry
    return since


async def test_summary_counts_latency_open_and_unsent(client, services, clock):
    since = await _seed(services, clock)
    answer = await client.get("/v1/notifications/summary", params={"since": since.isoformat()})
    assert answer.status_code == 200, answer.text
    summary = answer.json()
    assert datetime.fromisoformat(summary["since"]) == since
    assert datetime.fromisoformat(summary["at"]) == clock.now()
    assert summary["by_category"] == {
        "admin_alert": {"FAILED_PERMANENT": 1},
        "customer_driver_found": {"DELIVERED": 1, "PENDING": 1, "SENT": 1},
        "customer_search_started": {"CANCELLED": 1},
        "driver_offer": {"EXPIRED": 1, "PENDING": 1, "SENT": 1},
        "offer_taken": {"FAILED": 1},
    }
    assert summary["latency_s"] == {
        "customer_driver_found": {"sent": 2, "p50": 3.0, "p99": 3.98, "max": 4.0},
        "driver_offer": {"sent": 1, "p50": 1.0, "p99": 1.0, "max": 1.0},
    }
    assert summary["open"] == 3
    assert summary["open_past_expiry"] == 1
    # the cancelled "search started" is moot, not unsent; the row before the window is not counted
    assert summary["must_deliver_unsent"] == {"admin_alert": 1, "customer_driver_found": 1}


async def test_summary_defaults_to_the_last_hour_and_needs_staff(client, services, clock):
    await _write(services.db, "customer_no_driver", "+221770000400")
    clock.advance(3600 + 1)
    await _write(services.db, "customer_no_driver", "+221770000401")
    summary = (await client.get("/v1/notifications/summary")).json()
    assert summary["by_category"] == {"customer_no_driver": {"PENDING": 1}}
    assert summary["must_deliver_unsent"] == {"customer_no_driver": 1}
    assert datetime.fromisoformat(summary["since"]) == clock.now() - timedelta(hours=1)

    naive = await client.get("/v1/notifications/summary", params={"since": "2026-01-05T08:00:00"})
    assert (naive.status_code, naive.json()["code"]) == (422, "VALIDATION_ERROR")
    anonymous = await client.get("/v1/notifications/summary", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    _, key = await post_driver_with_key(client)
    forbidden = await client.get("/v1/notifications/summary", headers={"Authorization": f"Bearer {key}"})
    assert forbidden.status_code == 403


def test_must_deliver_helpers_follow_the_priority_policy():
    by_category = {
        "customer_driver_found": {"PENDING": 2, "SENDING": 1, "SENT": 4, "CANCELLED": 1},
        "admin_alert": {"FAILED": 1, "EXPIRED": 2},
        "driver_offer": {"PENDING": 50, "EXPIRED": 9},
        "offer_taken": {"FAILED": 3},
    }
    assert report.is_must_deliver("customer_search_started") and report.is_must_deliver("admin_alert")
    assert not report.is_must_deliver("driver_offer") and not report.is_must_deliver("offer_cancelled")
    assert report.must_deliver_open(by_category) == 4
    assert report.must_deliver_unsent(by_category) == {"admin_alert": 3, "customer_driver_found": 3}
    assert report.must_deliver_unsent({"customer_driver_found": {"SENT": 1, "READ": 2}}) == {}
    assert report.latency([]) == {"sent": 0, "p50": None, "p99": None, "max": None}


def test_render_shows_states_latency_and_the_unsent():
    console = Console(record=True, width=160)
    report.render(
        {
            "since": "2026-01-05T08:00:00+00:00",
            "by_category": {
                "customer_driver_found": {"SENT": 3, "PENDING": 1},
                "driver_offer": {"EXPIRED": 2},
            },
            "latency_s": {"customer_driver_found": {"sent": 3, "p50": 1.5, "p99": 7.25, "max": 8.0}},
            "open": 1,
            "open_past_expiry": 0,
            "must_deliver_unsent": {"customer_driver_found": 1},
        },
        console,
    )
    text = console.export_text()
    assert "customer_driver_found" in text and "expired" in text and "7.25" in text
    assert "never sent: customer_driver_found 1" in text


def test_cli_summary_prints_and_fails_on_unsent(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path}/s.db"
    env = {"DISPATCHD_DATABASE_URL": url, "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY, "COLUMNS": "200"}
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"], env=env).exit_code == 0
    start = datetime.now(UTC) - timedelta(seconds=5)

    async def seed() -> None:
        db = Database(url)
        try:
            sent = await _write(db, "customer_driver_found", "+221770000500")
            await _write(db, "driver_offer", "+221770000501", expires_in_s=30)
            await _set(db, sent, status="SENT", sent_at=datetime.now(UTC))
        finally:
            await db.dispose()

    asyncio.run(seed())
    table = runner.invoke(cli, ["notifications", "summary", "--since", start.isoformat()], env=env)
    assert table.exit_code == 0, table.output
    assert "customer_driver_found" in table.output and "never sent: none" in table.output
    as_json = runner.invoke(cli, ["notifications", "summary", "--json"], env=env)
    assert json.loads(as_json.output)["by_category"]["driver_offer"] == {"PENDING": 1}

    async def unsent() -> None:
        db = Database(url)
        try:
            await _write(db, "admin_alert", "+221770000502")
        finally:
            await db.dispose()

    asyncio.run(unsent())
    failing = runner.invoke(cli, ["notifications", "summary"], env=env)
    assert failing.exit_code == 1 and "admin_alert 1" in failing.output
    naive = runner.invoke(cli, ["notifications", "summary", "--since", "2026-01-05T08:00"], env=env)
    assert naive.exit_code == 2


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T00:00Z"])
def test_cli_summary_refuses_a_bad_since(bad: str, tmp_path: Path):
    env = {
        "DISPATCHD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/b.db",
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
    }
    assert CliRunner().invoke(cli, ["notifications", "summary", "--since", bad], env=env).exit_code == 2
