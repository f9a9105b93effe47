"""Issue 14, seed 004: manual cancel (API), the monitoring statistics (API and CLI), ``notifications retry``
honouring the backoff unless ``--now``, and ``notifications health --check``. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select, update
from typer.testing import CliRunner

from dispatchd.cli import app as cli
from dispatchd.core import events, topics
from dispatchd.core.db import Database
from dispatchd.notifications import outbox
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message
from tests.conftest import ADMIN_KEY
from tests.factories import post_driver_with_key


async def _post(client, n: int = 1) -> str:
    created = await client.post(
        "/v1/notifications", json={"recipient": f"+22177000010{n}", "category": "info", "body": f"m{n}"}
    )
    return created.json()["id"]


async def _set(services, notification_id: str, **values) -> None:
    async with services.db.transaction() as session:
        await session.execute(update(Notification).where(Notification.id == notification_id).values(**values))


# ----------------------------------------------------------------------------------------- cancel


async def test_cancel_a_pending_message_it_is_never_sent(client, services):
    notification_id = await _post(client)
    cancelled = await client.post(f"/v1/notifications/{notification_id}/cancel")
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert (body["status"], body["cancel_reason"]) == ("CANCELLED", "cancelled by an operator")
    assert await services.delivery.run_once() == 0
    async with services.db.read() as session:
        row = await session.get(Notification, notification_id)
        logged = await events.read(session, topics=[topics.NOTIFICATIONS], limit=100)
    [event] = [e for e in logged if e.type == "NotificationCancelled"]
    assert row.status == "CANCELLED" and row.sent_at is None
    assert event.data["id"] == notification_id and event.data["by"]
    again = await client.post(f"/v1/notifications/{notification_id}/cancel")
    assert (again.status_code, again.json()["code"]) == (409, "INVALID_STATE")


async def test_cancel_a_failed_message(client, services):
    notification_id = await _post(client)
    await _set(services, notification_id, status="FAILED", attempts=2)
    assert (await client.post(f"/v1/notifications/{notification_id}/cancel")).json()["status"] == "CANCELLED"


async def test_cancel_refuses_sending_and_sent_messages(client, services):
    for status in ("SENDING", "SENT", "DELIVERED", "FAILED_PERMANENT", "EXPIRED"):
        notification_id = await _post(client)
        await _set(services, notification_id, status=status)
        refused = await client.post(f"/v1/notifications/{notification_id}/cancel")
        assert (refused.status_code, refused.json()["code"]) == (409, "INVALID_STATE"), status
        async with services.db.read() as session:
            assert (await session.get(Notification, notification_id)).status == status


async def test_cancel_unknown_is_404_and_staff_only(client):
    missing = await client.post("/v1/notifications/ntf_nope/cancel")
    assert (missing.status_code, missing.json()["code"]) == (404, "NOTIFICATION_NOT_FOUND")
    notification_id = await _post(client)
    _, driver_key = await post_driver_with_key(client)
    forbidden = await client.post(
        f"/v1/notifications/{notification_id}/cancel", headers={"Authorization": f"Bearer {driver_key}"}
    )
    assert forbidden.status_code == 403
    assert (await client.get("/v1/notifications", params={"status": "CANCELLED"})).json()["total"] == 0


# ------------------------------------------------------------------------------------- statistics


async def _record_failures(services, kinds: list[str]) -> None:
    async with services.db.transaction() as session:
        for kind in kinds:
            event = "NotificationFailedPermanently" if kind == "PERMANENT" else "NotificationFailed"
            events.append(session, topics.NOTIFICATIONS, event, {"id": "ntf_x", "error_kind": kind})


async def test_health_gives_failed_counts_success_rate_and_error_classes(client, services, clock):
    ids = [await _post(client, n) for n in range(4)]
    await _set(services, ids[0], status="SENT", sent_at=clock.now())
    await _set(services, ids[1], status="SENT", sent_at=clock.now())
    await _set(services, ids[2], status="FAILED")
    await _set(services, ids[3], status="FAILED_PERMANENT")
    await _record_failures(services, ["TEMPORARY", "TEMPORARY", "PERMANENT"])
    clock.advance(23 * 3600)
    await _record_failures(services, ["ALERT"])
    report = (await client.get("/v1/notifications/health")).json()
    assert report["failed"] == {"temporary": 1, "permanent": 1}
    assert report["last_24h"]["sent"] == 2 and report["last_24h"]["failed_attempts"] == 4
    assert report["last_24h"]["success_rate"] == round(2 / 6, 4)
    assert report["last_24h"]["failed_attempts_by_class"] == {"TEMPORARY": 2, "PERMANENT": 1, "ALERT": 1}
    assert report["last_hour"]["failed_attempts"] == 1
    clock.advance(2 * 3600)  # the first ones leave the 24 h window
    later = (await client.get("/v1/notifications/health")).json()["last_24h"]
    assert (later["sent"], later["failed_attempts"], later["success_rate"]) == (0, 1, 0.0)


# --------------------------------------------------------------------------------------------- CLI


def _seed(url: str, messages: list[tuple[str, int, float]]) -> list[str]:
    """FAILED messages ``(phone, attempts, next attempt in s from now)``; their ids."""

    async def work() -> list[str]:
        db = Database(url)
        try:
            async with db.transaction() as session:
                ids = await outbox.enqueue(
                    session, [Message(phone, "info", "hello") for phone, _, _ in messages]
                )
                for notification_id, (_, attempts, due_in) in zip(ids, messages, strict=True):
                    await session.execute(
                        update(Notification)
                        .where(Notification.id == notification_id)
                        .values(
                            status="FAILED",
                            attempts=attempts,
                            last_error="HTTP 503",
                            next_attempt_at=session.info["now"] + timedelta(seconds=due_in),
                        )
                    )
            return ids
        finally:
            await db.dispose()

    return asyncio.run(work())


def _due(url: str) -> dict[str, object]:
    async def work():
        db = Database(url)
        try:
            async with db.read() as session:
                return dict(
                    (await session.execute(select(Notification.id, Notification.next_attempt_at))).all()
                )
        finally:
            await db.dispose()

    return asyncio.run(work())


def _env(url: str) -> dict[str, str]:
    return {"DISPATCHD_DATABASE_URL": url, "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY, "COLUMNS": "200"}


def test_retry_honours_the_backoff_unless_now(db_url):
    env, runner = _env(db_url), CliRunner()
    due_id, later_id = _seed(db_url, [("+221770000201", 2, -60), ("+221770000202", 3, 3600)])
    before = _due(db_url)

    default = runner.invoke(cli, ["notifications", "retry"], env=env)
    assert default.exit_code == 0, default.output
    assert "📅 Date/Heure actuelle : " in default.output and "Notifications trouvées : 1" in default.output
    lines = [line for line in default.output.splitlines() if line.startswith("📧 ")]
    assert len(lines) == 1 and due_id in lines[0] and "tentatives 2/10" in lines[0]
    assert "+221770000201" not in default.output  # the phone is masked
    assert "✅ 1 notification(s) mise(s) en file" in default.output
    assert _due(db_url) == before  # backoff honoured: nothing moved

    dry = runner.invoke(cli, ["notifications", "retry", "--now", "--dry-run"], env=env)
    assert "Notifications trouvées : 2" in dry.output and "✅ 0 notification(s) mise(s) en file" in dry.output
    assert _due(db_url) == before

    forced = runner.invoke(cli, ["notifications", "retry", "--now"], env=env)
    assert forced.exit_code == 0 and "✅ 2 notification(s) mise(s) en file" in forced.output
    after = _due(db_url)
    assert after[later_id] < before[later_id]  # made due now, its backoff ignored

    capped = runner.invoke(cli, ["notifications", "retry", "--now", "--max-retries", "3"], env=env)
    assert "Notifications trouvées : 1" in capped.output and due_id in capped.output


def test_health_shows_the_statistics_and_check_exits_non_zero_when_a_rule_holds(db_url):
    env, runner = _env(db_url), CliRunner()
    quiet = runner.invoke(cli, ["notifications", "health", "--check"], env=env)
    assert quiet.exit_code == 0, quiet.output
    assert '"success_rate": null' in quiet.output and '"alerts": []' in quiet.output

    async def fail_attempts() -> None:
        db = Database(db_url)
        try:
            async with db.transaction() as session:
                for _ in range(20):
                    events.append(
                        session,
                        topics.NOTIFICATIONS,
                        "NotificationFailed",
                        {"id": "x", "error_kind": "TEMPORARY"},
                    )
        finally:
            await db.dispose()

    asyncio.run(fail_attempts())
    plain = runner.invoke(cli, ["notifications", "health"], env=env)
    assert plain.exit_code == 0 and '"failed_attempts": 20' in plain.output and '"check"' not in plain.output
    checked = runner.invoke(cli, ["notifications", "health", "--check"], env=env)
    assert checked.exit_code == 1, checked.output
    assert '"FAILURES_1H"' in checked.output and '"sent": [' in checked.output
    assert "SWEEPER_STALLED" not in checked.output  # no sweeper runs in the CLI's process
    again = runner.invoke(cli, ["notifications", "health", "--check"], env=env)
    assert again.exit_code == 1 and '"sent": []' in again.output  # still holds; cooling down, not re-sent
