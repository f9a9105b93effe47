"""Probes, component health, Prometheus metrics, settings validation."""

from __future__ import annotations

import pytest

from dispatchd.config import SettingsError, load_settings
from tests.factories import create_booking, create_driver, create_drivers
from tests.prom import sample


async def test_liveness_needs_no_key(client):
    response = await client.get("/health", headers={"Authorization": ""})
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_ready_needs_a_ticking_sweeper(client, services):
    not_yet = await client.get("/ready")
    assert not_yet.status_code == 503 and not_yet.json()["checks"]["sweeper"]["alive"] is False
    await services.sweeper.run_once()
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_ready_reports_a_lagging_sweeper(client, services, clock):
    await create_driver(services)
    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)
    await services.sweeper.run_once()
    clock.advance(30 + 31)  # offers due 31 s ago and nobody swept
    lagging = await client.get("/ready")
    assert lagging.status_code == 503 and lagging.json()["checks"]["sweeper"]["lag_s"] == 31


async def test_component_health_follows_the_seed(client, services, clock):
    await services.sweeper.run_once()
    healthy = (await client.get("/v1/health")).json()
    assert healthy["overall"] == "HEALTHY"
    assert set(healthy["components"]) == {"database", "notifications", "sweeper", "matching", "dispatcher"}
    assert healthy["components"]["dispatcher"] == {
        "status": "HEALTHY",
        "agents_online": 0,
        "pending_conversations": 0,
        "oldest_pending_s": None,
    }

    booking = await create_booking(services)
    await services.matching.start_matching(booking.id)
    clock.advance(120)  # the customer's message has waited 2 min: the channel is not draining
    await services.sweeper.run_once()
    warning = (await client.get("/v1/health")).json()
    assert warning["components"]["notifications"]["status"] == "WARNING"
    assert warning["overall"] == "WARNING" and warning["metrics"]["active_matchings"] == 1


async def test_component_health_grades_the_outbox_on_customer_and_admin_messages(client, services, clock):
    from dispatchd.notifications import outbox

    async with services.db.transaction() as session:
        await outbox.enqueue(session, [outbox.Message("+221770009999", "driver_offer", "offer")])
    clock.advance(120)  # a paced driver offer may wait: that is the fleet saturating, not the outbox failing
    report = (await client.get("/v1/health")).json()["components"]["notifications"]
    assert (report["status"], report["oldest_customer_or_admin_due_s"]) == ("HEALTHY", None)
    assert report["oldest_waiting_s"] == 120

    async with services.db.transaction() as session:
        await outbox.enqueue(session, [outbox.Message("+221780009999", "customer_driver_found", "found")])
    clock.advance(301)
    report = (await client.get("/v1/health")).json()["components"]["notifications"]
    assert (report["status"], report["oldest_customer_or_admin_due_s"]) == ("CRITICAL", 301)


async def test_metrics_move_with_a_search_and_its_answer(client, services, clock):
    """Counters are process-wide (other tests move them too): each is read before and after the action."""
    drivers = await create_drivers(services, 2)
    booking = await create_booking(services)
    before = (await client.get("/metrics")).text
    assert sample(before, "dispatchd_notification_backlog") == 0

    await services.matching.start_matching(booking.id)
    started = (await client.get("/metrics")).text
    for name, moved in (
        ("dispatchd_matching_started_total", 1),
        ("dispatchd_offers_sent_total", 2),
        ("dispatchd_broadcast_drivers_count", 1),
        ("dispatchd_broadcast_drivers_sum", 2),
        ("dispatchd_time_to_match_seconds_count", 0),
    ):
        assert sample(started, name) == sample(before, name) + moved, name
    backlog = sample(started, "dispatchd_notification_backlog")
    assert backlog >= 2  # the two offers at least, written with the search
    assert sample(started, "dispatchd_notification_held_by_pacing") == 0

    clock.advance(4)
    assert (await services.matching.respond(booking.id, drivers[0].id, "ACCEPT")).action == "ASSIGNED"
    answered = (await client.get("/metrics")).text
    assert sample(answered, "dispatchd_time_to_match_seconds_count") == (
        sample(started, "dispatchd_time_to_match_seconds_count") + 1
    )
    assert sample(answered, "dispatchd_time_to_match_seconds_bucket", le="3.0") == sample(
        started, "dispatchd_time_to_match_seconds_bucket", le="3.0"
    ), "a match after 4 s counted in the 3 s bucket"
    assert sample(answered, "dispatchd_time_to_match_seconds_bucket", le="5.0") == (
        sample(started, "dispatchd_time_to_match_seconds_bucket", le="5.0") + 1
    )


async def test_stats_report_rates_times_and_drivers(client, services, clock):
    matching = services.matching
    fast, slow = await create_drivers(services, 2)
    for _ in range(2):
        booking = await create_booking(services)
        await matching.start_matching(booking.id)
        clock.advance(4)
        await matching.respond(booking.id, slow.id, "REJECT")
        await matching.respond(booking.id, fast.id, "ACCEPT")
        await matching.complete(booking.id)
    lonely = await create_booking(services)
    await matching.start_matching(lonely.id)
    clock.advance(301)
    await services.sweeper.run_once()

    stats = (await client.get("/v1/matching/stats")).json()

    assert (stats["searches"], stats["matched"], stats["timed_out"]) == (3, 2, 1)
    assert stats["acceptance_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert stats["timeout_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert stats["time_to_match_s"] == {"mean": 4.0, "p50": 4.0, "p95": 4.0}
    drivers = {d["driver_id"]: d for d in stats["drivers"]}
    assert drivers[fast.id]["acceptance_rate"] == 1.0 and drivers[fast.id]["mean_response_time_s"] == 4.0
    assert drivers[slow.id]["acceptance_rate"] == 0.0 and drivers[slow.id]["responses"] == 2
    assert (
        await client.get(
            "/v1/matching/stats", params={"from": "2030-01-01T00:00:00Z", "to": "2029-01-01T00:00:00Z"}
        )
    ).status_code == 422


def test_invalid_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("DISPATCHD_OFFER_TIMEOUT_S", "-3")
    monkeypatch.setenv("DISPATCHD_DATABASE_URL", "mysql://nope")
    with pytest.raises(SettingsError) as error:
        load_settings(_env_file=None)
    assert "DISPATCHD_OFFER_TIMEOUT_S" in str(error.value) and "DISPATCHD_DATABASE_URL" in str(error.value)


def test_admin_phones_are_a_comma_separated_e164_list(monkeypatch):
    monkeypatch.setenv("DISPATCHD_ADMIN_PHONES", "+221770000000, +33600000000")
    assert load_settings(_env_file=None).admin_phones == ["+221770000000", "+33600000000"]
    monkeypatch.setenv("DISPATCHD_ADMIN_PHONES", "0600000000")
    with pytest.raises(SettingsError, match="DISPATCHD_ADMIN_PHONES"):
        load_settings(_env_file=None)
