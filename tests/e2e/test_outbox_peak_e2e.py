"""Issue 7 proof: the outbox under a real peak, end to end.

A real ``dispatchd serve`` process (SQLite file, real clock, sweeper and delivery worker on, pacing
``DISPATCHD_RECIPIENT_INTERVAL_S=6``) takes the shipped trace's busiest 30 minutes
(2014-04-30 18:22–18:52, 110 pickups) replayed by :func:`dispatchd.replay.run_replay` at ×40 with 100
drivers, searches lasting ``SEARCH_TIMEOUT_S`` = 40 s real (44 s of bookings; 70–100 s per run on 2 cores
when the outbox keeps up), twice:

- ``log`` channel, drivers reading their offers from the event log (``--fleet events``);
- ``whatsapp_cloud`` channel to the fake WhatsApp Cloud API (``dispatchd fake-whatsapp``, its own process,
  Meta's pair rate limit on: 6 s), drivers seeing only what the outbox sent and tapping its buttons
  through signed webhooks (``--fleet whatsapp``).

Each run ends, read from the database once the outbox has settled (bounded wait), with:

1. every customer and admin message (``policy.must_deliver``) SENT within ``MUST_DELIVER_BOUND_S`` = 15 s
   of being written (two pacing slots of 6 s plus the send), or CANCELLED as moot;
2. no PENDING / FAILED row past its expiry (``SWEEP_GRACE_S`` of slack for the sweep in progress);
3. every ``driver_offer`` row SENT before its expiry, CANCELLED or EXPIRED;
4. every row in a final state: 0 lost;
5. 0 pair-limit refusals at the fake (WhatsApp run);
6. 0 double assignments (replay and database), every booking final, the replay's summary ``ok``.

A failure lists every broken rule with counts, the outbox by category and state, and the replay's own
summary. Run alone: ``.venv/bin/python -m pytest -q -s tests/e2e/test_outbox_peak_e2e.py``.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from sqlalchemy import func, select

from dispatchd.core.db import Database
from dispatchd.core.stats import percentile
from dispatchd.matching.models import Booking, BookingOffer
from dispatchd.notifications import report
from dispatchd.notifications.models import Notification
from dispatchd.replay import SHIPPED_TRIPS, ReplayOptions, ReplaySummary, run_replay
from tests.conftest import ADMIN_KEY, free_port

ROOT = Path(__file__).resolve().parents[2]
START, END = datetime(2014, 4, 30, 18, 22), datetime(2014, 4, 30, 18, 52)
PICKUPS = 110
SPEED = 40.0
DRIVERS = 100
PAIR_INTERVAL_S = 6.0
MUST_DELIVER_BOUND_S = 15.0
SWEEP_GRACE_S = 2.0
# Real seconds a search lasts: every search ends within the drain, and the timeouts' "aucun chauffeur" and
# admin alerts (a burst, to one admin phone) are among the messages checked.
SEARCH_TIMEOUT_S = 40.0
DRAIN_TIMEOUT_S = 60.0  # real seconds for the last searches after the last booking
OUTBOX_WAIT_S = 45.0  # then for the customer and admin messages
SETTLE_TIMEOUT_S = 45.0  # then for every row to be final (offers and notices expire within 30 s)
RUN_TIMEOUT_S = 420.0
APP_SECRET = "e2e-app-secret"
ADMIN_PHONE = "+12125550000"

SENT = frozenset({"SENT", "DELIVERED", "READ"})
OPEN = frozenset({"PENDING", "SENDING", "FAILED"})
FINAL = frozenset({"SENT", "DELIVERED", "READ", "FAILED_PERMANENT", "CANCELLED", "EXPIRED"})


def _spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("w") as handle:  # a file, not a pipe: a full pipe would block the process
        return subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{url} exited:\n{_tail(log)}"
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer in {timeout_s:g} s:\n{_tail(log)}")


@dataclass
class Peak:
    server_url: str
    database_url: str
    fake_url: str | None
    logs: Path


@pytest.fixture
async def peak_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Peak]:
    """``dispatchd serve`` on a fresh SQLite file; with ``whatsapp`` (the param), the fake in front."""
    channel = request.param
    database_url = f"sqlite+aiosqlite:///{tmp_path}/peak.db"
    env = {
        "DISPATCHD_DATABASE_URL": database_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_ADMIN_PHONES": ADMIN_PHONE,
        "DISPATCHD_RECIPIENT_INTERVAL_S": str(PAIR_INTERVAL_S),
        "DISPATCHD_SEARCH_TIMEOUT_S": str(SEARCH_TIMEOUT_S),
        "DISPATCHD_RATE_LIMIT": "",
        "DISPATCHD_LOG_LEVEL": "WARNING",
        "DISPATCHD_LOG_JSON": "true",
    }
    processes: list[subprocess.Popen] = []
    fake_url = None
    try:
        if channel == "whatsapp":
            fake_port = free_port()
            fake_url = f"http://127.0.0.1:{fake_port}"
            fake_log = tmp_path / "fake.log"
            processes.append(
                _spawn(
                    [sys.executable, "-m", "dispatchd", "fake-whatsapp", "--port", str(fake_port),
                     "--pair-interval-s", str(PAIR_INTERVAL_S)],
                    fake_log,
                )
            )  # fmt: skip
            await _wait_http(f"{fake_url}/stats", processes[-1], fake_log)
            env |= {
                "DISPATCHD_NOTIFICATION_CHANNEL": "whatsapp_cloud",
                "DISPATCHD_WHATSAPP_API_BASE_URL": f"{fake_url}/v21.0",
                "DISPATCHD_WHATSAPP_ACCESS_TOKEN": "fake-token",
                "DISPATCHD_WHATSAPP_PHONE_NUMBER_ID": "1234567890",
                "DISPATCHD_WHATSAPP_APP_SECRET": APP_SECRET,
            }
        port = free_port()
        server_log = tmp_path / "server.log"
        processes.append(
            _spawn([sys.executable, "-m", "dispatchd", "serve", "--port", str(port)], server_log, env)
        )
        server_url = f"http://127.0.0.1:{port}"
        await _wait_http(f"{server_url}/ready", processes[-1], server_log, timeout_s=60)
        yield Peak(server_url, database_url, fake_url, tmp_path)
    finally:
        for process in reversed(processes):
            _stop(process)


async def _replay(peak: Peak, fleet: str) -> tuple[ReplaySummary, str]:
    output = io.StringIO()
    console = Console(file=output, width=120, force_terminal=False)
    options = ReplayOptions(
        trips_path=SHIPPED_TRIPS,
        url=peak.server_url,
        api_key=ADMIN_KEY,
        start=START,
        end=END,
        speed=SPEED,
        drivers=DRIVERS,
        drain_timeout_s=DRAIN_TIMEOUT_S,
        outbox_wait_s=OUTBOX_WAIT_S,
        fleet=fleet,
        whatsapp_fake_url=peak.fake_url,
        webhook_secret=APP_SECRET if fleet == "whatsapp" else None,
    )
    started = time.monotonic()
    summary = await asyncio.wait_for(run_replay(options, console), RUN_TIMEOUT_S)
    summary.render(console)
    text = output.getvalue()
    print(f"\n--- replay, fleet {fleet}: {time.monotonic() - started:.0f} s real ---\n{text}")
    return summary, text


async def _open_rows(db: Database) -> int:
    async with db.read() as session:
        return int(
            await session.scalar(select(func.count()).where(Notification.status.in_(sorted(OPEN)))) or 0
        )


async def _settle(db: Database) -> float:
    """Wait (bounded) until no row is open; return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_TIMEOUT_S:
        if not await _open_rows(db):
            break
        await asyncio.sleep(1.0)
    return time.monotonic() - started


def _outbox_table(rows: list[Notification]) -> str:
    by_category: dict[str, Counter[str]] = defaultdict(Counter)
    waits: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_category[row.category][row.status] += 1
        if row.status in SENT and row.sent_at is not None:
            waits[row.category].append((row.sent_at - row.created_at).total_seconds())
    lines = []
    for category, counts in sorted(by_category.items()):
        values = waits[category]
        times = (
            f"written→sent p50 {percentile(values, 50):.1f} s, p99 {percentile(values, 99):.1f} s, "
            f"max {max(values):.1f} s"
            if values
            else "never sent"
        )
        lines.append(f"  {category}: {dict(sorted(counts.items()))}; {times}")
    return "\n".join(lines)


async def _violations(peak: Peak, summary: ReplaySummary, fleet: str) -> tuple[list[str], str]:
    """Every broken rule of the module docstring, with counts; and the outbox as a table."""
    db = Database(peak.database_url)
    try:
        waited = await _settle(db)
        now = datetime.now(UTC)
        async with db.read() as session:
            rows = list((await session.scalars(select(Notification))).all())
            bookings = list((await session.scalars(select(Booking))).all())
            accepted = (
                await session.execute(
                    select(BookingOffer.booking_id, func.count())
                    .where(BookingOffer.response == "ACCEPTED")
                    .group_by(BookingOffer.booking_id)
                    .having(func.count() > 1)
                )
            ).all()
    finally:
        await db.dispose()
    problems: list[str] = []

    must = [row for row in rows if report.is_must_deliver(row.category)]
    unsent = Counter((row.category, row.status) for row in must if row.status not in SENT | {"CANCELLED"})
    if unsent:
        problems.append(f"customer/admin messages not sent: {dict(unsent)}")
    late = [
        (row.category, (row.sent_at - row.created_at).total_seconds())
        for row in must
        if row.status in SENT
        and row.sent_at is not None
        and (row.sent_at - row.created_at).total_seconds() > MUST_DELIVER_BOUND_S
    ]
    if late:
        worst = max(seconds for _, seconds in late)
        problems.append(
            f"customer/admin messages sent later than {MUST_DELIVER_BOUND_S:g} s after being written: "
            f"{len(late)} ({dict(Counter(category for category, _ in late))}), worst {worst:.1f} s"
        )

    past_expiry = Counter(
        row.category
        for row in rows
        if row.status in ("PENDING", "FAILED")
        and row.expires_at is not None
        and row.expires_at <= now - timedelta(seconds=SWEEP_GRACE_S)
    )
    if past_expiry:
        problems.append(f"PENDING/FAILED rows past their expiry: {dict(past_expiry)}")

    offers = [row for row in rows if row.category == "driver_offer"]
    bad_offers = Counter(row.status for row in offers if row.status not in SENT | {"CANCELLED", "EXPIRED"})
    if bad_offers:
        problems.append(f"driver offers neither sent, cancelled nor expired: {dict(bad_offers)}")
    sent_late = [
        row
        for row in offers
        if row.status in SENT
        and row.sent_at is not None
        and row.expires_at is not None
        and row.sent_at > row.expires_at
    ]
    if sent_late:
        problems.append(f"driver offers sent after their expiry: {len(sent_late)}")

    not_final = Counter((row.category, row.status) for row in rows if row.status not in FINAL)
    if not_final:
        problems.append(
            f"rows not in a final state {waited:.0f} s after the replay (lost): {dict(not_final)}"
        )

    if fleet == "whatsapp":
        async with httpx.AsyncClient(base_url=str(peak.fake_url), timeout=10) as fake:
            stats = (await fake.get("/stats")).json()
        if stats["pair_limit_hits"]:
            # a carrier's error is recorded on every row it carried, and stays on rows sent later
            refused = Counter((row.category, row.status) for row in rows if row.error_code == "META_131056")
            problems.append(
                f"pair-limit refusals (Meta 131056) at the fake: {stats['pair_limit_hits']}; rows carrying "
                f"that error now, by category and status: {dict(refused)}"
            )
        if not summary.taps_sent.get("ACCEPT") or not summary.whatsapp_messages_seen:
            problems.append(
                f"the WhatsApp fleet never answered: {summary.whatsapp_messages_seen} offer messages seen, "
                f"taps {summary.taps_sent}"
            )

    if summary.aborted:
        problems.append(f"replay aborted: {summary.aborted}")
    if summary.double_assignments or summary.drivers_double_booked or accepted:
        problems.append(
            f"double assignments: replay {summary.double_assignments}, drivers double-booked "
            f"{summary.drivers_double_booked}, bookings with several ACCEPTED offers {len(accepted)}"
        )
    statuses = Counter(booking.status for booking in bookings)
    if len(bookings) != PICKUPS or statuses["PENDING"] or statuses["SEARCHING"]:
        problems.append(f"bookings: {len(bookings)} of {PICKUPS} written, by status {dict(statuses)}")
    if not summary.ok and not summary.aborted:
        problems.append(f"replay summary not ok: must_deliver_unsent {summary.must_deliver_unsent}")
    return problems, _outbox_table(rows)


async def _prove(peak: Peak, fleet: str) -> None:
    summary, text = await _replay(peak, fleet)
    problems, table = await _violations(peak, summary, fleet)
    print(f"outbox by category (database):\n{table}")
    assert not problems, (
        f"{len(problems)} broken rule(s), fleet {fleet}, ×{SPEED:g}, {DRIVERS} drivers:\n- "
        + "\n- ".join(problems)
        + f"\noutbox by category:\n{table}\nreplay:\n{text[-6000:]}"
    )


@pytest.mark.parametrize("peak_server", ["log"], indirect=True)
async def test_peak_with_the_log_channel_and_an_event_log_fleet(peak_server: Peak) -> None:
    await _prove(peak_server, "events")


@pytest.mark.parametrize("peak_server", ["whatsapp"], indirect=True)
async def test_peak_through_the_fake_whatsapp_with_a_whatsapp_fleet(peak_server: Peak) -> None:
    await _prove(peak_server, "whatsapp")
