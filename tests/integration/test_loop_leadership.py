"""Background loops run in every process (``serve --workers N``, ``dispatchd worker --processes M``): two
instances on one database, racing the same tick, never send one report or one alert twice, and neither
fails (a failed deadline handler is itself an admin alert, ``DEADLINE_FAILED``).

Each test builds two :class:`~dispatchd.assembly.Services` on the same database (two processes' worth of
engines and loops) and runs the same loop in both at once, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio

from sqlalchemy import delete, func, select

from dispatchd.app import Services, build_services
from dispatchd.dispatcher.models import ScheduledRun
from dispatchd.dispatcher.scheduler import DISTRIBUTION, PENDING_ALERT_RULE
from dispatchd.matching.models import MatchingSchedule
from dispatchd.notifications import outbox
from dispatchd.notifications.models import AlertState, Notification
from dispatchd.notifications.outbox import Message
from tests.conftest import make_settings, new_phone
from tests.integration.test_dispatcher_scenarios import new_agent, write

ROUNDS = 5


def handler(services: Services, name: str):
    """The sweeper's handler of the deadline called ``name``, as ``async (db, limit) -> int``."""
    [deadline] = [d for d in services.sweeper.deadlines if d.name == name]
    return deadline.handle


async def both(first: Services, second: Services, name: str) -> list[int]:
    """Run deadline ``name`` in both instances at once; raises what either raised."""
    return await asyncio.gather(handler(first, name)(first.db, 500), handler(second, name)(second.db, 500))


async def count(services: Services, model, *where) -> int:
    async with services.db.read() as session:
        return await session.scalar(select(func.count()).select_from(model).where(*where))


async def pair(settings, clock) -> tuple[Services, Services]:
    return build_services(settings, clock), build_services(settings, clock)


async def test_two_report_schedulers_plan_once_and_send_each_report_once(db_url, clock):
    settings = make_settings(db_url, report_daily_schedule="0 7 * * *", timezone="UTC")
    first, second = await pair(settings, clock)
    try:
        for _ in range(ROUNDS):  # the first tick of two fresh instances: both find no schedule row
            async with first.db.transaction() as session:
                await session.execute(delete(MatchingSchedule))
            assert await both(first, second, "matching_reports") == [0, 0]
            assert await count(first, MatchingSchedule) == 1
        async with first.db.read() as session:
            due = await session.scalar(select(MatchingSchedule.next_run_at))
        clock.set(due)
        sent = await both(first, second, "matching_reports")
        assert sorted(sent) == [0, 1]
        reports = await count(first, Notification, Notification.category == "admin_report")
        assert reports == len(settings.admin_phones) == 1
        assert await both(first, second, "matching_reports") == [0, 0]  # the next one is tomorrow
    finally:
        await first.aclose()
        await second.aclose()


async def test_two_dispatcher_schedules_plan_once(db_url, clock):
    settings = make_settings(db_url, dispatch_schedule="30 9 * * *", timezone="Africa/Dakar")
    first, second = await pair(settings, clock)
    try:
        for _ in range(ROUNDS):
            async with first.db.transaction() as session:
                await session.execute(delete(ScheduledRun))
            assert await both(first, second, DISTRIBUTION) == [0, 0]
            assert await count(first, ScheduledRun, ScheduledRun.name == DISTRIBUTION) == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_two_dispatchers_alert_once_on_a_pending_conversation(db_url, clock):
    settings = make_settings(db_url, pending_alert_s=600)
    first, second = await pair(settings, clock)
    try:
        await new_agent(first)  # OFFLINE: the customer waits
        await write(first, new_phone())
        clock.advance(601)
        for _ in range(ROUNDS):  # the rule's first firing: no alert_state row yet in either instance
            async with first.db.transaction() as session:
                await session.execute(delete(AlertState).where(AlertState.rule == PENDING_ALERT_RULE))
                await session.execute(delete(Notification).where(Notification.category == "admin_alert"))
            assert sorted(await both(first, second, "conversation_pending_alert")) == [0, 1]
            assert await count(first, Notification, Notification.category == "admin_alert") == 1
    finally:
        await first.aclose()
        await second.aclose()


async def test_two_alert_monitors_fire_each_rule_once(db_url, clock):
    settings = make_settings(db_url, notification_latency_alert_s=60)
    first, second = await pair(settings, clock)
    try:
        async with first.db.transaction() as session:
            await outbox.enqueue(session, [Message(recipient=new_phone(), category="customer", body="x")])
        clock.advance(61)  # SLOW_DELIVERY holds (and SWEEPER_STALLED: neither sweeper ticked)
        for _ in range(ROUNDS):
            async with first.db.transaction() as session:
                await session.execute(delete(AlertState))
                await session.execute(delete(Notification).where(Notification.category == "admin_alert"))
            checks = await asyncio.gather(first.alerts.check(), second.alerts.check())
            fired = [alert.rule for check in checks for alert in check.sent]
            assert "SLOW_DELIVERY" in fired
            assert sorted(fired) == sorted(set(fired))  # no rule fired by both
            alerts = await count(first, Notification, Notification.category == "admin_alert")
            assert alerts == len(fired)  # one admin phone: one message per alert
    finally:
        await first.aclose()
        await second.aclose()
