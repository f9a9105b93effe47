"""Issue 14: every admin alert rule of the 60 s monitor (seed 004 §5, seed 000 AdminAlertService) fires at
its threshold, not below it, and again after its cooldown; severities route critical alerts to WhatsApp and
email, warnings to email only. SQLite and PostgreSQL, on a ManualClock."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from dispatchd.app import build_services
from dispatchd.core import events, topics
from dispatchd.core.sweeper import Deadline, Sweeper
from dispatchd.matching import alerts as matching_alerts
from dispatchd.notifications import outbox
from dispatchd.notifications.alerts import AlertMonitor, Severity, Thresholds, failed_attempts
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message
from tests.conftest import make_settings
from tests.factories import create_booking, create_drivers
from tests.integration.test_delivery_scenarios import FakeMeta, _worker, meta_error, ok

PHONE, EMAIL = "+33600000000", "ops@example.com"
HOUR = 3600


def _monitor(services, sweeper=None, **settings_overrides) -> AlertMonitor:
    """A monitor with the thresholds of the settings (defaults unless overridden), one admin phone and one
    admin email. The alerts it writes stay unsent (no worker runs): SLOW_DELIVERY is kept out of the way."""
    settings_overrides.setdefault("notification_latency_alert_s", 10 * 24 * HOUR)
    settings = make_settings(services.settings.database_url, **settings_overrides)
    return AlertMonitor(
        services.db,
        [],
        admin_phones=(PHONE,),
        admin_emails=(EMAIL,),
        thresholds=Thresholds.from_settings(settings),
        sweeper=sweeper,
        email_enabled=settings.alert_email_enabled,
        whatsapp_enabled=settings.alert_whatsapp_enabled,
    )


async def _failures(services, count: int, *, permanent: bool = False, kind: str = "TEMPORARY") -> None:
    """``count`` failed send attempts, as the delivery worker records them (one event each)."""
    event = "NotificationFailedPermanently" if permanent else "NotificationFailed"
    async with services.db.transaction() as session:
        for n in range(count):
            events.append(
                session,
                topics.NOTIFICATIONS,
                event,
                {"id": f"ntf_{n}", "status": "FAILED", "error_code": "HTTP_503", "error_kind": kind},
            )


async def _sent(services, count: int) -> None:
    async with services.db.transaction() as session:
        ids = await outbox.enqueue(session, [Message(f"+2217800{n:05d}", "info", "x") for n in range(count)])
        await session.execute(
            update(Notification)
            .where(Notification.id.in_(ids))
            .values(status="SENT", sent_at=session.info["now"])
        )


async def _rules(monitor: AlertMonitor) -> set[str]:
    return {alert.rule for alert in await monitor.run_once()}


async def _alert_rows(services) -> list[Notification]:
    async with services.db.read() as session:
        return list(
            (
                await session.scalars(
                    select(Notification)
                    .where(Notification.category == "admin_alert")
                    .order_by(Notification.created_at, Notification.recipient)
                )
            ).all()
        )


# ------------------------------------------------------------------------------------ seed 004 rules


async def test_failed_attempts_are_counted_from_the_event_log_not_from_failed_rows(services, clock):
    fake = FakeMeta(meta_error(503, 131000), meta_error(503, 131000), meta_error(503, 131000), ok)
    worker = _worker(services, fake)
    started = clock.now()
    async with services.db.transaction() as session:
        await outbox.enqueue(session, [Message("+221770000001", "customer_search_started", "hello")])
    for _ in range(3):
        await worker.run_once()
        async with services.db.read() as session:
            row = await session.scalar(select(Notification))
        clock.set(row.next_attempt_at)
    await worker.run_once()
    async with services.db.read() as session:
        row = await session.scalar(select(Notification))
        attempts = await failed_attempts(session, started)  # 30 min, 1 h, 2 h of backoff: over 3 h
    assert row.status == "SENT" and attempts == 3  # three failed attempts, no row failed now


async def test_failures_1h_fires_at_20_attempts_not_19_and_again_after_the_cooldown(services, clock):
    monitor = _monitor(services)
    await _sent(services, 100)  # keeps the failure rate under 50 %
    await _failures(services, 19)
    assert "FAILURES_1H" not in await _rules(monitor)
    await _failures(services, 1)
    assert "FAILURES_1H" in await _rules(monitor)
    clock.advance(HOUR - 1)
    await _failures(services, 20)
    assert "FAILURES_1H" not in await _rules(monitor)  # still cooling down
    clock.advance(1)
    assert "FAILURES_1H" in await _rules(monitor)  # 20 of the last hour, cooldown over


async def test_failures_1h_window_is_one_hour(services, clock):
    monitor = _monitor(services, alert_failure_rate=1.0)
    await _failures(services, 19)
    clock.advance(HOUR + 1)
    await _failures(services, 1)
    assert "FAILURES_1H" not in await _rules(monitor)  # the 19 are older than an hour


async def test_permanent_24h_fires_at_5_not_4_by_email_only_and_again_after_the_cooldown(services, clock):
    monitor = _monitor(services)
    await _sent(services, 100)
    await _failures(services, 4, permanent=True, kind="PERMANENT")
    assert "PERMANENT_24H" not in await _rules(monitor)
    clock.advance(12 * HOUR)
    await _failures(services, 1, permanent=True, kind="PERMANENT")
    [alert] = [a for a in await monitor.run_once() if a.rule == "PERMANENT_24H"]
    assert alert.severity is Severity.WARNING and "5 échecs définitifs" in alert.text
    rows = await _alert_rows(services)
    assert [r.recipient for r in rows] == [EMAIL] and "ATTENTION" in rows[0].body  # a warning: no WhatsApp
    clock.advance(HOUR - 1)
    assert "PERMANENT_24H" not in await _rules(monitor)
    clock.advance(1)
    assert "PERMANENT_24H" in await _rules(monitor)  # the 5 are still within 24 h


async def test_failure_rate_fires_at_50_percent_with_10_outcomes(services, clock):
    monitor = _monitor(services)
    await _sent(services, 6)
    await _failures(services, 4)
    assert "FAILURE_RATE_1H" not in await _rules(monitor)  # 40 %
    await _failures(services, 1)  # 5 / 11
    assert "FAILURE_RATE_1H" not in await _rules(monitor)
    await _failures(services, 1)  # 6 / 12 = 50 %
    fired = {a.rule: a for a in await monitor.run_once()}
    assert fired["FAILURE_RATE_1H"].severity is Severity.CRITICAL and "50%" in fired["FAILURE_RATE_1H"].text
    assert {r.recipient for r in await _alert_rows(services)} == {PHONE, EMAIL}  # critical: both
    clock.advance(HOUR)
    await _sent(services, 6)
    await _failures(services, 6)
    assert "FAILURE_RATE_1H" in await _rules(monitor)


async def test_failure_rate_needs_10_outcomes(services, clock):
    monitor = _monitor(services)
    await _sent(services, 4)
    await _failures(services, 5)  # 56 % of 9
    assert "FAILURE_RATE_1H" not in await _rules(monitor)
    await _sent(services, 1)  # 50 % of 10
    assert "FAILURE_RATE_1H" in await _rules(monitor)


async def test_thresholds_cooldown_and_severities_come_from_the_settings(services, clock):
    monitor = _monitor(
        services,
        alert_failures_per_hour=3,
        alert_cooldown_s=600,
        alert_severities={"failures_1h": "warning", "FAILURE_RATE_1H": "off"},
    )
    await _failures(services, 3)
    [alert] = await monitor.run_once()  # the rate rule (100 %) is off
    assert (alert.rule, alert.severity) == ("FAILURES_1H", Severity.WARNING)
    clock.advance(600)
    await _failures(services, 3)
    assert await _rules(monitor) == {"FAILURES_1H"}


async def test_whatsapp_disabled_sends_critical_alerts_by_email_only(services, clock):
    monitor = _monitor(services, alert_whatsapp_enabled=False)
    await _failures(services, 20)
    assert "FAILURES_1H" in await _rules(monitor)
    assert {r.recipient for r in await _alert_rows(services)} == {EMAIL}


async def test_a_prefix_configures_every_channel_of_a_rule(services):
    thresholds = Thresholds(severities={"CIRCUIT_OPEN": "warning"})
    from dispatchd.notifications.alerts import Alert

    alert = Alert("CIRCUIT_OPEN:wachap", Severity.CRITICAL, "x")
    assert thresholds.severity_of(alert) is Severity.WARNING


def test_an_unknown_severity_stops_start_up(tmp_path):
    with pytest.raises(ValueError, match="severity must be critical, warning or off"):
        make_settings(f"sqlite+aiosqlite:///{tmp_path}/x.db", alert_severities={"FAILURES_1H": "loud"})


async def test_the_assembled_monitor_has_the_settings_and_every_domain_rule(db_url, clock):
    services = build_services(make_settings(db_url, alert_failures_per_hour=7, alert_interval_s=30), clock)
    try:
        monitor = services.alerts
        assert monitor.thresholds.failures_per_hour == 7 and monitor.interval_s == 30
        assert monitor.sweeper is services.sweeper
        names = {rule.__name__ for rule in monitor.rules}
        assert names == {"low_driver_availability", "search_timeout_rate"}
    finally:
        await services.aclose()


# ------------------------------------------------------------------ seed 000 alertSystemError rules


async def test_sweeper_stalled_fires_past_the_critical_lag_and_again_after_the_cooldown(services, clock):
    sweeper = Sweeper(services.db)
    monitor = _monitor(services, sweeper=sweeper)  # DISPATCHD_SWEEPER_LAG_CRITICAL_S = 30
    await sweeper.run_once()
    clock.advance(30)
    assert "SWEEPER_STALLED" not in await _rules(monitor)
    clock.advance(1)
    [alert] = await monitor.run_once()
    assert alert.rule == "SWEEPER_STALLED" and alert.area == "Système" and "31 s" in alert.text
    await sweeper.run_once()  # it recovers
    clock.advance(HOUR - 31)
    await sweeper.run_once()
    assert await _rules(monitor) == set()
    clock.advance(31)  # stalls again, the cooldown is over
    assert await _rules(monitor) == {"SWEEPER_STALLED"}


async def test_a_sweeper_that_never_ticked_counts_from_the_monitor_start(services, clock):
    monitor = _monitor(services, sweeper=Sweeper(services.db))
    clock.advance(30)
    assert await _rules(monitor) == set()
    clock.advance(1)
    assert await _rules(monitor) == {"SWEEPER_STALLED"}


async def test_a_failed_deadline_handler_alerts_within_the_minute(services, clock):
    broken = True

    async def handle(db, limit):
        if broken:
            raise RuntimeError("boom +221771234567")
        return 0

    async def oldest_due(session, now):
        return None

    sweeper = Sweeper(services.db)
    sweeper.register(Deadline("booking_expiry", handle, oldest_due))
    monitor = _monitor(services, sweeper=sweeper)
    assert await _rules(monitor) == set()
    await sweeper.run_once()
    [alert] = await monitor.run_once()
    assert alert.rule == "DEADLINE_FAILED" and "booking_expiry" in alert.text and "RuntimeError" in alert.text
    assert "+221771234567" not in alert.text  # the exception's message may carry a customer's phone
    broken = False
    clock.advance(HOUR - 1)
    await sweeper.run_once()
    assert await _rules(monitor) == set()  # the failure is older than a minute
    broken = True
    clock.advance(1)
    await sweeper.run_once()
    assert await _rules(monitor) == {"DEADLINE_FAILED"}
    assert sweeper.failures_total == 2


class _Unreachable:
    """A database that does not answer, with the real one's clock."""

    def __init__(self, db) -> None:
        self.clock = db.clock

    def transaction(self):
        raise OperationalError("connect", {}, ConnectionRefusedError("refused"))


async def test_an_unreachable_database_is_alerted_once_it_answers_again(services, clock):
    monitor = _monitor(services)
    real = monitor.db
    monitor.db = _Unreachable(real)
    first = clock.now()
    assert await monitor.run_once() == []
    clock.advance(60)
    assert await monitor.run_once() == []
    assert monitor.outage == (first, clock.now(), 2)
    clock.advance(60)
    monitor.db = real
    [alert] = await monitor.run_once()
    assert alert.rule == "DATABASE_UNREACHABLE" and alert.severity is Severity.CRITICAL
    assert first.strftime("%H:%M:%S") in alert.text and "2 évaluation(s)" in alert.text
    assert monitor.outage is None and await monitor.run_once() == []
    # a second outage after the cooldown is reported again
    clock.advance(HOUR)
    monitor.db = _Unreachable(real)
    await monitor.run_once()
    monitor.db = real
    assert await _rules(monitor) == {"DATABASE_UNREACHABLE"}


# ------------------------------------------------------------------------------ seed 000 matching rules


async def test_low_driver_availability_fires_below_the_threshold_while_searching(services, clock):
    monitor = _monitor(services)
    monitor.rules = matching_alerts.rules(services.settings)  # DISPATCHD_LOW_DRIVERS_THRESHOLD = 3
    drivers = await create_drivers(services, 3)
    booking = await create_booking(services)
    assert await _rules(monitor) == set()  # nobody searching
    await services.matching.start_matching(booking.id)
    assert await _rules(monitor) == set()  # 3 available: not below the threshold
    await services.matching.update_driver(drivers[0].id, {"status": "OFFLINE"})
    [alert] = await monitor.run_once()
    assert alert.rule == "LOW_DRIVER_AVAILABILITY" and alert.severity is Severity.WARNING
    assert "2 chauffeur(s) disponible(s) (seuil 3)" in alert.text and alert.area == "Matching"
    clock.advance(HOUR - 1)
    assert await _rules(monitor) == set()
    clock.advance(1)
    assert await _rules(monitor) == {"LOW_DRIVER_AVAILABILITY"}


async def test_search_timeout_rate_fires_at_the_rate_with_enough_searches(services, clock):
    monitor = _monitor(services)
    settings = make_settings(services.settings.database_url, timeout_rate_alert=0.8)
    monitor.rules = [matching_alerts.rules(settings)[1]]  # at least 5 finished searches
    bookings = [await create_booking(services) for _ in range(6)]
    for booking in bookings:
        await services.matching.start_matching(booking.id)
    await services.matching.cancel(bookings[5].id, "customer changed their mind")
    clock.advance(services.settings.search_timeout_s)
    await services.sweeper.run_once()  # 5 TIMEOUT + 1 CANCELLED: 83 %
    [alert] = await monitor.run_once()
    assert alert.rule == "SEARCH_TIMEOUT_RATE" and "5 recherche(s) sur 6" in alert.text


async def _holding(monitor: AlertMonitor) -> set[str]:
    """The rules that hold now, cooldowns not considered."""
    async with monitor.db.read() as session:
        return {alert.rule for alert in await monitor.evaluate(session, session.info["now"])}


async def test_search_timeout_rate_at_the_rate_not_below_it_nor_below_the_minimum(services, clock):
    monitor = _monitor(services)
    settings = make_settings(services.settings.database_url, timeout_rate_alert=0.8)
    monitor.rules = [matching_alerts.rules(settings)[1]]
    bookings = [await create_booking(services) for _ in range(5)]
    for booking in bookings:
        await services.matching.start_matching(booking.id)
    await services.matching.cancel(bookings[4].id, "changed their mind")
    clock.advance(services.settings.search_timeout_s - 1)
    await services.sweeper.run_once()
    clock.advance(1)
    assert await _holding(monitor) == set()  # 1 finished search: under the minimum of 5
    await services.sweeper.run_once()  # 4 TIMEOUT of 5 finished = 80 %, the threshold
    assert await _rules(monitor) == {"SEARCH_TIMEOUT_RATE"}
    more = await create_booking(services)
    await services.matching.start_matching(more.id)
    await services.matching.cancel(more.id, "changed their mind")  # 4 of 6 = 67 %
    assert await _holding(monitor) == set()
