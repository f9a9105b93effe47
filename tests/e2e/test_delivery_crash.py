"""Crash test with real processes on PostgreSQL (issue 3): a delivery worker killed with SIGKILL mid-batch.

A fake WhatsApp Cloud API runs in its own process (``bench/fake_whatsapp.py``) and records every message
it accepted, by notification id (``biz_opaque_callback_data``). 300 notifications are written to the
outbox; a ``dispatchd serve`` process (channel ``whatsapp_cloud`` pointed at the fake, lease 2 s) starts
sending them and is killed with SIGKILL while a batch is in flight; a second process takes over. After
the restart every row reaches a final state, none is lost, and the duplicates (messages the fake
accepted twice because the first worker died before recording them) are counted, printed, and bounded
by the rows the first worker left SENDING.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from dispatchd.core.db import Database
from dispatchd.notifications import outbox
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus
from dispatchd.notifications.outbox import Message
from tests.conftest import ADMIN_KEY, free_port, reset_postgres

N = 300
LATENCY_MS = 150  # every send takes this long, so a batch is in flight most of the time
CONCURRENCY = 10  # rows per claim: 30 batches, a few seconds of sending
KILL_AFTER_SENT = 60
FINAL = {NotificationStatus.SENT, NotificationStatus.FAILED_PERMANENT, NotificationStatus.EXPIRED}
ROOT = Path(__file__).resolve().parents[2]


def start(command: list[str], output: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process; its output goes to a file (a pipe would fill and block it)."""
    with output.open("w") as log:
        return subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=15)


def sigkill(process: subprocess.Popen) -> int:
    process.kill()  # SIGKILL: no shutdown hook, no final commit
    return process.wait(timeout=15)


async def statuses(db: Database) -> dict[str, int]:
    async with db.read() as session:
        rows = await session.execute(select(Notification.status, func.count()).group_by(Notification.status))
        return {status: count for status, count in rows.all()}


async def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


@pytest.mark.postgres
async def test_worker_killed_mid_batch_loses_nothing_and_duplicates_are_counted(postgres_url, tmp_path):
    await reset_postgres(postgres_url)
    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = {
        "DISPATCHD_DATABASE_URL": postgres_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_LOG_JSON": "true",
        "DISPATCHD_NOTIFICATION_CHANNEL": "whatsapp_cloud",
        "DISPATCHD_WHATSAPP_API_BASE_URL": f"{fake_url}/v21.0",
        "DISPATCHD_WHATSAPP_ACCESS_TOKEN": "fake-token",
        "DISPATCHD_WHATSAPP_PHONE_NUMBER_ID": "1234567890",
        "DISPATCHD_RECIPIENT_INTERVAL_S": "0",
        "DISPATCHD_CHANNEL_RATE": "",  # empty: no drain limit (wiring turns "" into None)
        "DISPATCHD_DELIVERY_LEASE_S": "2",
        "DISPATCHD_DELIVERY_CONCURRENCY": str(CONCURRENCY),
    }
    worker_command = [sys.executable, "-m", "dispatchd", "serve", "--port"]
    processes: list[subprocess.Popen] = []
    db = Database(postgres_url)
    try:
        processes.append(
            start(
                [sys.executable, "-m", "bench.fake_whatsapp", "--port", str(fake_port),
                 "--fail-rate", "0.0", "--latency-ms", str(LATENCY_MS)],
                tmp_path / "fake.log",
            )
        )  # fmt: skip
        async with httpx.AsyncClient(base_url=fake_url, timeout=5) as fake:

            async def fake_up() -> bool:
                assert processes[0].poll() is None, (tmp_path / "fake.log").read_text()
                try:
                    return (await fake.get("/stats")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(fake_up, 15, "the fake WhatsApp server", interval_s=0.05)

            async with db.transaction() as session:
                ids = await outbox.enqueue(
                    session,
                    [
                        Message(recipient=f"+22170{i:07d}", category="information", body=f"message {i}")
                        for i in range(N)
                    ],
                )

            first = start([*worker_command, str(free_port())], tmp_path / "worker-1.log", env)
            processes.append(first)

            async def mid_batch() -> dict[str, int] | None:
                assert first.poll() is None, (tmp_path / "worker-1.log").read_text()[-3000:]
                counts = await statuses(db)
                sent = counts.get(NotificationStatus.SENT, 0)
                return counts if KILL_AFTER_SENT <= sent < N and counts.get("SENDING", 0) else None

            before = await wait_until(mid_batch, 30, f"{KILL_AFTER_SENT} rows SENT and a batch in flight")
            assert sigkill(first) == -9
            at_kill = await statuses(db)
            in_flight = at_kill.get(NotificationStatus.SENDING, 0)
            delivered_at_kill = (await fake.get("/stats")).json()
            print(f"\nbefore kill: {before}; after kill: {at_kill}; fake server: {delivered_at_kill}")
            assert at_kill.get(NotificationStatus.SENT, 0) < N

            second = start([*worker_command, str(free_port())], tmp_path / "worker-2.log", env)
            processes.append(second)

            async def all_final() -> dict[str, int] | None:
                assert second.poll() is None, (tmp_path / "worker-2.log").read_text()[-3000:]
                counts = await statuses(db)
                return counts if not any(counts.get(s, 0) for s in OPEN_STATUSES) else None

            final = await wait_until(all_final, 60, "every notification in a final state", interval_s=0.1)
            stats = (await fake.get("/stats", params={"ids": 1})).json()

        counts: dict[str, int] = stats.pop("counts")
        duplicated = {nid: n for nid, n in counts.items() if n > 1}
        print(f"final: {final}; fake server: {stats}")
        print(f"rows SENDING at the kill: {in_flight}; duplicates: {stats['duplicates']} {duplicated}")

        assert sum(final.values()) == N
        assert set(final) <= FINAL, final
        assert final == {NotificationStatus.SENT: N}  # the fake never fails: every row is SENT
        lost = [nid for nid in ids if counts.get(nid, 0) == 0]
        assert lost == [], f"{len(lost)} notifications never reached the fake server"
        assert set(counts) == set(ids)
        assert stats["duplicates"] == sum(n - 1 for n in duplicated.values())
        assert stats["duplicates"] <= in_flight  # only rows left SENDING by the killed worker
        assert all(n == 2 for n in duplicated.values())  # sent by each worker at most once
        async with db.read() as session:
            reclaimed = set(
                (await session.scalars(select(Notification.id).where(Notification.attempts > 1))).all()
            )
        assert set(duplicated) <= reclaimed  # a duplicate is always a row claimed again after the kill
    finally:
        for process in reversed(processes):
            stop(process)
        await db.dispose()
