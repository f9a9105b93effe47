"""The outbox's operator surface: send with Idempotency-Key, retry, replay, health; and the CLI."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from typer.testing import CliRunner

from dispatchd.cli import app as cli
from dispatchd.notifications.models import Notification
from tests.conftest import ADMIN_KEY


async def _fail(services, notification_id: str, status: str = "FAILED_PERMANENT") -> None:
    async with services.db.transaction() as session:
        await session.execute(
            update(Notification)
            .where(Notification.id == notification_id)
            .values(status=status, attempts=10, failed_at=session.info["now"], next_attempt_at=None)
        )


async def test_send_with_idempotency_key_writes_once(client):
    body = {"recipient": "+221770000001", "category": "colis_arrive", "body": "Votre colis est arrivé"}
    first = await client.post("/v1/notifications", json=body, headers={"Idempotency-Key": "parcel-42"})
    again = await client.post("/v1/notifications", json=body, headers={"Idempotency-Key": "parcel-42"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = await client.post(
        "/v1/notifications", json={**body, "body": "autre"}, headers={"Idempotency-Key": "parcel-42"}
    )
    assert other.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert (await client.get("/v1/notifications", params={"category": "colis_arrive"})).json()["total"] == 1
    bad = await client.post("/v1/notifications", json={**body, "recipient": "0612"})
    assert bad.json()["code"] == "VALIDATION_ERROR"


async def test_retry_and_replay_put_failed_messages_back(client, services, clock):
    ids = []
    for n in range(3):
        created = await client.post(
            "/v1/notifications", json={"recipient": f"+22177000001{n}", "category": "info", "body": f"m{n}"}
        )
        ids.append(created.json()["id"])
    pending = await client.post(f"/v1/notifications/{ids[0]}/retry")
    assert pending.json()["code"] == "INVALID_STATE"
    await _fail(services, ids[0])
    retried = (await client.post(f"/v1/notifications/{ids[0]}/retry")).json()
    assert (retried["status"], retried["attempts"]) == ("PENDING", 0)

    since = clock.now()
    clock.advance(10)
    await _fail(services, ids[1])
    await _fail(services, ids[2], status="FAILED")
    replayed = await client.post("/v1/notifications/replay", json={"since": since.isoformat()})
    assert replayed.json() == {"requeued": 2}
    assert (await client.get("/v1/notifications", params={"status": "PENDING"})).json()["total"] == 3


async def test_health_reports_backlog_channels_and_errors(client, services):
    await client.post(
        "/v1/notifications", json={"recipient": "+221770000020", "category": "info", "body": "x"}
    )
    report = (await client.get("/v1/notifications/health")).json()
    assert report["backlog"] == 1 and report["by_status"] == {"PENDING": 1}
    assert [c["channel"] for c in report["channels"]] == ["log"] and report["channels"][0][
        "circuit"
    ] == "CLOSED"


def test_cli_retry_list_and_health(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path}/n.db"
    env = {"DISPATCHD_DATABASE_URL": url, "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY}
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"], env=env).exit_code == 0

    import asyncio

    from dispatchd.core.db import Database
    from dispatchd.notifications import outbox
    from dispatchd.notifications.outbox import Message

    async def seed() -> None:
        db = Database(url)
        async with db.transaction() as session:
            ids = await outbox.enqueue(session, [Message("+221770000030", "info", "hello")])
            await session.execute(
                update(Notification)
                .where(Notification.id == ids[0])
                .values(
                    status="FAILED",
                    attempts=2,
                    last_error="HTTP 503",
                    next_attempt_at=session.info["now"] + timedelta(hours=1),
                )
            )
        await db.dispose()

    asyncio.run(seed())
    waiting = runner.invoke(cli, ["notifications", "retry"], env=env)  # its backoff has an hour to run
    assert "Notifications trouvées : 0" in waiting.output
    dry = runner.invoke(cli, ["notifications", "retry", "--now", "--dry-run", "--verbose"], env=env)
    assert (
        dry.exit_code == 0
        and "Notifications trouvées : 1" in dry.output
        and "Mises en file      : 0" in dry.output
    )
    done = runner.invoke(cli, ["notifications", "retry", "--now", "--max-retries", "10"], env=env)
    assert "Mises en file      : 1" in done.output
    skipped = runner.invoke(cli, ["notifications", "retry", "--now", "--max-retries", "2"], env=env)
    assert "Notifications trouvées : 0" in skipped.output
    listed = runner.invoke(
        cli, ["notifications", "list", "--status", "FAILED"], env={**env, "COLUMNS": "200"}
    )
    assert "+221770000030" in listed.output
    health = runner.invoke(cli, ["notifications", "health"], env=env)
    assert health.exit_code == 0 and '"backlog": 1' in health.output
