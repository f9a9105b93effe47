"""Batched claims and outcomes (issue 11): one claim takes N rows in one UPDATE, two claimers never share
a row, a batch of mixed outcomes is recorded in one pass with every rule of the single-row record kept,
and a crash between send and record re-sends at most the rows that were in flight."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import timedelta

from sqlalchemy import event, select, update

from dispatchd.core import events, topics
from dispatchd.core.db import Database
from dispatchd.notifications import outbox
from dispatchd.notifications.channels.base import (
    ChannelError,
    Classification,
    ErrorKind,
    OutboundMessage,
    SendResult,
)
from dispatchd.notifications.delivery import DeliveryWorker
from dispatchd.notifications.models import Notification
from dispatchd.notifications.outbox import Message


class ScriptedChannel:
    """Answers each recipient as ``script`` says (``"sent"``, ``"temporary"``, ``"permanent"``); counts
    every call per notification id."""

    name = "scripted"

    def __init__(self, script: dict[str, str] | None = None) -> None:
        self.script = script or {}
        self.calls: Counter[str] = Counter()

    async def send(self, message: OutboundMessage) -> SendResult:
        self.calls[message.id] += 1
        answer = self.script.get(message.recipient, "sent")
        if answer == "temporary":
            raise ChannelError("HTTP 503", Classification(ErrorKind.TEMPORARY, "HTTP_503"))
        if answer == "permanent":
            raise ChannelError("Meta 131026", Classification(ErrorKind.PERMANENT, "META_131026"))
        return SendResult(provider_message_id=f"wamid.{message.id}")


class Statements:
    """Counts the UPDATE statements sent to the database (an executemany counts once)."""

    def __init__(self, db: Database) -> None:
        self.updates: list[str] = []
        self.engine = db.engine.sync_engine
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith(("UPDATE", "WITH")) and "notifications" in statement:
            self.updates.append(statement)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


async def _enqueue(db: Database, messages: list[Message]) -> list[str]:
    async with db.transaction() as session:
        return await outbox.enqueue(session, messages)


async def _rows(db: Database) -> dict[str, Notification]:
    async with db.read() as session:
        return {row.id: row for row in (await session.scalars(select(Notification))).all()}


def _offers(count: int, **fields) -> list[Message]:
    return [
        Message(recipient=f"+22177{n:07d}", category="driver_offer", body=f"offer {n}", **fields)
        for n in range(count)
    ]


async def test_a_claim_of_n_rows_is_one_update_and_two_concurrent_claimers_never_share_a_row(services, clock):
    """Two workers with their own connections (two processes' worth) claim batches of 8 at once until the
    outbox is empty: every row is claimed exactly once, with one attempt."""
    ids = await _enqueue(services.db, _offers(60))
    other_db = Database(services.db.url, clock=clock)
    try:
        first = DeliveryWorker(services.db, ScriptedChannel(), concurrency=8, lease_s=60)
        second = DeliveryWorker(other_db, ScriptedChannel(), concurrency=8, lease_s=60)
        statements = Statements(services.db)
        try:
            batch = await first._claim()
        finally:
            statements.close()
        assert len(batch) == 8
        assert len(statements.updates) == 1  # the 8 rows move to SENDING in one statement
        taken: list[list[str]] = [[item.message.id for item in batch]]
        while True:
            a, b = await asyncio.gather(first._claim(), second._claim())
            if not a and not b:
                break
            taken += [[item.message.id for item in a], [item.message.id for item in b]]
            assert len(a) <= 8 and len(b) <= 8
    finally:
        await other_db.dispose()
    claimed = [row_id for group in taken for row_id in group]
    assert Counter(claimed) == Counter(ids)  # all of them, none twice
    rows = await _rows(services.db)
    assert {(row.status, row.attempts) for row in rows.values()} == {("SENDING", 1)}
    assert {row.next_attempt_at for row in rows.values()} == {clock.now() + timedelta(seconds=60)}


async def test_a_batch_of_mixed_outcomes_is_recorded_in_one_pass(services, clock):
    """Sent, retried (the category's backoff), failed for good, expired before its send, made moot in
    flight, and one whose lease another worker took: one UPDATE for the sent rows and one for the others;
    each row as the single-row record left it, with its event."""
    phones = {
        name: f"+2217800000{n}" for n, name in enumerate(["sent", "retry", "dead", "late", "moot", "lost"])
    }
    soon = clock.now() + timedelta(seconds=1)
    later = clock.now() + timedelta(minutes=5)
    ids = {}
    for name, phone in phones.items():
        [ids[name]] = await _enqueue(
            services.db,
            [
                Message(
                    recipient=phone,
                    category="driver_offer",
                    body=name,
                    expires_at=soon if name == "late" else later,
                )
            ],
        )
    channel = ScriptedChannel(
        {phones["retry"]: "temporary", phones["moot"]: "temporary", phones["dead"]: "permanent"}
    )
    worker = DeliveryWorker(services.db, channel, concurrency=32, lease_s=60, rng=random.Random(7))
    lane = worker.lanes[0]
    claimed = await worker._claim()
    assert len(claimed) == 6
    async with services.db.transaction() as session:
        await session.execute(  # a change made this one moot while it was in flight
            update(Notification)
            .where(Notification.id == ids["moot"])
            .values(cancel_reason="booking assigned")
        )
        await session.execute(  # its lease ran out and another worker claimed it again
            update(Notification).where(Notification.id == ids["lost"]).values(attempts=2)
        )
    clock.advance(2)  # "late" expires between claim and send
    outcomes = [await worker._send(lane, item) for item in claimed]
    after_send = clock.now()
    async with services.db.read() as session:
        last_event = max([0, *(e.id for e in await events.read(session, after_id=0, limit=10_000))])
    statements = Statements(services.db)
    try:
        await worker._record(lane, outcomes, probing=False)
    finally:
        statements.close()
    assert len(statements.updates) == 2  # the sent rows and every other outcome

    rows = await _rows(services.db)
    sent, retry, dead = rows[ids["sent"]], rows[ids["retry"]], rows[ids["dead"]]
    late, moot, lost = rows[ids["late"]], rows[ids["moot"]], rows[ids["lost"]]
    assert (sent.status, sent.attempts, sent.provider_message_id) == ("SENT", 1, f"wamid.{ids['sent']}")
    assert (retry.status, retry.attempts, retry.error_code, retry.error_kind) == (
        "FAILED",
        1,
        "HTTP_503",
        "TEMPORARY",
    )
    # driver_offer is time-critical: the first retry after 2 s ± 20 %
    wait = (retry.next_attempt_at - after_send).total_seconds()
    assert 1.6 <= wait <= 2.4
    assert (dead.status, dead.next_attempt_at, dead.error_code) == ("FAILED_PERMANENT", None, "META_131026")
    assert (late.status, late.next_attempt_at) == ("EXPIRED", None)
    assert channel.calls[ids["late"]] == 0  # never sent late
    assert (moot.status, moot.next_attempt_at) == ("CANCELLED", None)
    assert (lost.status, lost.attempts) == ("SENDING", 2)  # not ours any more: untouched
    assert channel.calls[ids["lost"]] == 1

    async with services.db.read() as session:
        written = await events.read(session, after_id=last_event, topics=[topics.NOTIFICATIONS], limit=100)
    announced = {e.data["id"]: e.type for e in written if "id" in e.data}
    assert announced == {
        ids["retry"]: "NotificationFailed",
        ids["dead"]: "NotificationFailedPermanently",
        ids["late"]: "NotificationExpired",
        ids["moot"]: "NotificationFailed",
    }
    assert [e.data["ids"] for e in written if e.type == "NotificationsSent"] == [[ids["sent"]]]
    assert next(e for e in written if e.data.get("id") == ids["retry"]).data["next_attempt_at"] == (
        retry.next_attempt_at.isoformat()
    )


async def test_a_crash_between_send_and_record_re_sends_at_most_the_rows_in_flight(services, clock):
    """A worker sends a batch and dies before recording it: once the lease ends the rows are claimed
    again; every message arrives, and only the rows of that batch arrive twice."""
    ids = await _enqueue(services.db, _offers(30))
    channel = ScriptedChannel()
    dying = DeliveryWorker(services.db, channel, concurrency=8, lease_s=30)
    lane = dying.lanes[0]
    in_flight = await dying._claim()
    assert len(in_flight) == 8
    for item in in_flight:
        await dying._send(lane, item)  # sent… and the process dies before the record
    survivor = DeliveryWorker(services.db, channel, concurrency=8, lease_s=30)
    while await survivor.run_once():  # the others; the leased rows wait for their lease
        pass
    assert sum(channel.calls.values()) == 30
    clock.advance(30)
    while await survivor.run_once():
        pass
    rows = await _rows(services.db)
    assert {row.status for row in rows.values()} == {"SENT"}
    assert set(channel.calls) == set(ids)  # none lost
    duplicated = {row_id for row_id, calls in channel.calls.items() if calls > 1}
    assert duplicated == {item.message.id for item in in_flight}  # at most the rows in flight
    assert max(channel.calls.values()) == 2
    assert {rows[row_id].attempts for row_id in duplicated} == {2}
