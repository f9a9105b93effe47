"""Paths no other test ran (issue 14): reading one reservation, a database that is down (health, ready),
the 500 answer, the start-up database retry, the alert monitor's loop, ReservationCancelled's payload."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy.exc import OperationalError

from dispatchd import migrate
from dispatchd.app import build_services, create_app
from dispatchd.core.db import Database
from dispatchd.health import health_report
from tests.conftest import admin_headers, free_port, make_settings
from tests.factories import post_resource


async def _reserve(client: httpx.AsyncClient, resource_id: str, client_id: str, quantity: int) -> dict:
    response = await client.post(
        "/v1/reservations", json={"resource_id": resource_id, "client_id": client_id, "quantity": quantity}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def test_get_one_reservation_then_an_unknown_one(client):
    resource_id = await post_resource(client, 5)
    created = await _reserve(client, resource_id, "awa", 2)

    read = await client.get(f"/v1/reservations/{created['id']}")
    assert read.status_code == 200
    assert {k: read.json()[k] for k in ("id", "resource_id", "client_id", "quantity", "status")} == {
        "id": created["id"],
        "resource_id": resource_id,
        "client_id": "awa",
        "quantity": 2,
        "status": "CONFIRMED",
    }

    await client.post(f"/v1/reservations/{created['id']}/cancel")
    assert (await client.get(f"/v1/reservations/{created['id']}")).json()["status"] == "CANCELLED"

    missing = await client.get("/v1/reservations/rsv_nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["code"] == "RESERVATION_NOT_FOUND"


async def test_reservation_cancelled_event_carries_the_freed_state(client, services):
    resource_id = await post_resource(client, 5)
    kept = await _reserve(client, resource_id, "awa", 1)
    cancelled = await _reserve(client, resource_id, "moussa", 3)
    assert (await client.post(f"/v1/reservations/{cancelled['id']}/cancel")).status_code == 200

    timeline = await services.reservations.timeline(resource_id)
    [event] = [e for e in timeline if e.type == "ReservationCancelled"]
    at = event.data.pop("at")
    assert event.data == {
        "reservation_id": cancelled["id"],
        "client_id": "moussa",
        "quantity": 3,
        "reserved": 1,  # only ``kept`` left
        "held": 0,
        "capacity": 5,
        "version": 4,  # created at 1, then one per change: two reservations, one cancel
    }
    assert at.startswith(cancelled["created_at"][:10])
    assert event.topic == f"resource:{resource_id}" and kept["id"] != cancelled["id"]


def _unreachable_url(backend: str, tmp_path) -> str:
    """A database nobody answers: a SQLite "file" that is a folder, a PostgreSQL port nobody listens on."""
    if backend == "sqlite":
        (tmp_path / "a-folder").mkdir()
        return f"sqlite+aiosqlite:///{tmp_path}/a-folder"
    return f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"


async def test_health_and_readiness_when_the_database_is_down(backend, tmp_path, clock):
    settings = make_settings(_unreachable_url(backend, tmp_path))
    services = build_services(settings, clock)
    try:
        report = await health_report(services.db, services.sweeper, services.domains, settings)
        assert report["overall"] == "CRITICAL"
        # the other components need the database: they are not asked (no exception, no hang)
        assert list(report["components"]) == ["database"]
        database = report["components"]["database"]
        assert database["status"] == "CRITICAL" and database["dialect"] == services.db.dialect
        assert database["error"] in {"OperationalError", "ConnectionRefusedError", "OSError"}
        assert "latency_ms" not in database

        app = create_app(settings, clock=clock, run_migrations=False, background=False, services=services)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            ready = await http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False and ready.json()["checks"]["database"] == database["error"]
    finally:
        await services.aclose()


async def test_an_unexpected_error_is_a_500_problem_without_a_stack_trace(services, settings, clock):
    secret = "password=hunter2 in the message of the exception"

    async def explode(*args, **kwargs):
        raise RuntimeError(secret)

    services.reservations.get_reservation = explode  # the route calls the service: make it fail
    app = create_app(settings, clock=clock, run_migrations=False, background=False, services=services)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=admin_headers()) as http:
        response = await http.get("/v1/reservations/rsv_1", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "INTERNAL_ERROR" and problem["status"] == 500
    assert problem["detail"] == "an unexpected error occurred; see the server log"
    for leak in ("hunter2", "Traceback", "RuntimeError", 'File "'):
        assert leak not in response.text
    assert problem["request_id"] == "req-500"  # what to look for in the server log


class _FlakyDatabase:
    """``ping`` fails ``failures`` times (as a database still starting does), then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if self.pings <= self.failures:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """tenacity's waits, recorded instead of slept (its default sleep calls ``asyncio.sleep``)."""
    waited: list[float] = []

    async def fake_sleep(seconds: float, *args) -> None:
        waited.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return waited


async def test_startup_waits_for_the_database_with_growing_waits(sleeps):
    db = _FlakyDatabase(failures=3)
    await migrate.wait_for_database(db, timeout_s=30)
    assert db.pings == 4
    assert sleeps == [0.2, 0.4, 0.8]  # exponential from 0.2 s (capped at 5 s)


async def test_startup_gives_up_with_the_database_error_after_its_timeout(sleeps):
    db = _FlakyDatabase(failures=10**6)
    with pytest.raises(OperationalError, match="connection refused"):
        await migrate.wait_for_database(db, timeout_s=0)
    assert db.pings == 1 and sleeps == []


async def test_startup_retry_through_prepare_database(db_url, monkeypatch, sleeps):
    """``serve``'s start-up path: the first pings fail, then migrations and the admin key proceed."""
    db = Database(db_url)
    real_ping, pings = db.ping, []

    async def flaky_ping() -> None:
        pings.append(1)
        if len(pings) < 3:
            raise OSError("connection refused")
        await real_ping()

    monkeypatch.setattr(db, "ping", flaky_ping)
    try:
        generated = await migrate.prepare_database(db, make_settings(db_url), migrate=False)
        assert generated is None  # the settings name an admin key: none is generated
        assert len(pings) == 3 and sleeps == [0.2, 0.4]
        assert await migrate.current_revision(db) == migrate.revisions()[-1]
    finally:
        await db.dispose()


async def test_alert_monitor_loop_survives_a_failure_and_stops_when_asked(services):
    monitor = services.alerts
    stop = asyncio.Event()
    outcomes: list[object] = []
    real_run_once = monitor.run_once

    async def run_once():
        if len(outcomes) == 1:
            outcomes.append("raised")
            raise RuntimeError("one evaluation failed")
        outcomes.append(await real_run_once())
        if len(outcomes) == 3:
            stop.set()
        return outcomes[-1]

    monitor.run_once = run_once
    monitor.interval_s = 0  # no wait between evaluations: the loop turns as fast as it can
    await asyncio.wait_for(monitor.run_forever(stop), timeout=10)
    assert outcomes == [[], "raised", []]  # evaluated, failed (logged), evaluated again, stopped


async def test_alert_monitor_loop_stops_during_its_wait(services):
    monitor = services.alerts
    monitor.interval_s = 3600
    stop = asyncio.Event()
    evaluated = asyncio.Event()
    real_run_once = monitor.run_once

    async def run_once():
        evaluated.set()
        return await real_run_once()

    monitor.run_once = run_once
    loop = asyncio.create_task(monitor.run_forever(stop))
    await asyncio.wait_for(evaluated.wait(), timeout=10)
    assert not loop.done()  # waiting for its next turn, an hour away
    stop.set()
    await asyncio.wait_for(loop, timeout=5)  # the wait ends at once, not after an hour
    assert loop.exception() is None


async def test_two_instances_starting_at_once_both_come_up_with_one_admin_key(settings):
    """Two ``dispatchd serve`` starting together on a fresh database both store DISPATCHD_ADMIN_API_KEY:
    the second insert meets the unique hash and must not fail the start-up."""
    import asyncio

    from sqlalchemy import func, select

    from dispatchd.core import auth
    from dispatchd.core.db import Database

    key = "dk_" + "k" * 43
    databases = [Database(settings.database_url) for _ in range(2)]

    async def start(db: Database) -> None:
        async with db.transaction() as session:
            await auth.ensure_admin_key(session, key)

    try:
        await asyncio.gather(*(start(db) for db in databases))
        async with databases[0].read() as session:
            stored = await session.scalar(
                select(func.count())
                .select_from(auth.ApiKey)
                .where(auth.ApiKey.key_hash == auth.hash_key(key))
            )
        assert stored == 1
    finally:
        for db in databases:
            await db.dispose()
