"""The delivery worker: claims due outbox rows with a lease, sends them, records the outcome.

Claim: one transaction moves due rows (PENDING, FAILED whose retry is due, or SENDING whose lease ran
out) to SENDING with ``next_attempt_at = now + lease`` and ``attempts + 1`` (``FOR UPDATE SKIP LOCKED``
on PostgreSQL). Send: outside any transaction. Record: SENT, FAILED with the next attempt, or
FAILED_PERMANENT. A worker killed between claim and record leaves rows SENDING; they are claimed again
when the lease ends, so delivery is at-least-once. Rows past ``expires_at`` become EXPIRED unsent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update

from dispatchd.core import metrics
from dispatchd.core.db import Database
from dispatchd.core.logging import get_logger
from dispatchd.notifications.channels.base import Channel, ChannelError, OutboundMessage
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus

log = get_logger("dispatchd.notifications.delivery")

MAX_ATTEMPTS = 10
BACKOFF_BASE_S = 30.0
BACKOFF_CAP_S = 3600.0


def backoff_s(attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: 30 s x 2^(attempts-1), capped at 1 h."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class _Claimed:
    message: OutboundMessage
    attempts: int


class DeliveryWorker:
    """Sends the outbox through one channel, at most ``concurrency`` rows per claim, all at once."""

    def __init__(
        self,
        db: Database,
        channel: Channel,
        *,
        batch_size: int = 200,
        lease_s: float = 60.0,
        concurrency: int = 32,
    ) -> None:
        self.db = db
        self.channel = channel
        # Every claimed row is sent at once: a claim never outgrows what is in flight, so no row waits
        # for a send slot while its lease runs out (the lease must exceed the channel's HTTP timeout).
        self.batch_size = min(batch_size, concurrency)
        self.lease_s = lease_s
        self.concurrency = concurrency
        self.wake = asyncio.Event()
        db.after_commit.append(self._on_commit)

    def _on_commit(self, info: dict) -> None:
        if info.get("notifications_written"):
            self.wake.set()

    async def _claim(self) -> list[_Claimed]:
        async with self.db.transaction() as session:
            now: datetime = session.info["now"]
            due = (
                select(Notification)
                .where(
                    Notification.status.in_([s.value for s in OPEN_STATUSES]),
                    Notification.next_attempt_at <= now,
                )
                .order_by(Notification.next_attempt_at, Notification.id)
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            )
            rows = list((await session.scalars(due)).all())
            claimed: list[_Claimed] = []
            for row in rows:
                if row.expires_at is not None and row.expires_at <= now:
                    row.status = NotificationStatus.EXPIRED.value
                    row.next_attempt_at = None
                    metrics.NOTIFICATIONS.labels(self.channel.name, "expired").inc()
                    continue
                row.status = NotificationStatus.SENDING.value
                row.attempts += 1
                row.channel = self.channel.name
                row.next_attempt_at = now + timedelta(seconds=self.lease_s)
                claimed.append(
                    _Claimed(
                        OutboundMessage(row.id, row.recipient, row.category, row.body, row.payload),
                        row.attempts,
                    )
                )
            return claimed

    async def _send(self, item: _Claimed, limiter: asyncio.Semaphore) -> tuple[_Claimed, object]:
        async with limiter:
            try:
                return item, await self.channel.send(item.message)
            except ChannelError as exc:
                return item, exc
            except Exception as exc:  # an adapter bug must not lose the row: treat as temporary
                log.exception("channel raised unexpectedly", notification_id=item.message.id)
                return item, ChannelError(repr(exc), temporary=True)

    async def run_once(self) -> int:
        """Claim, send and record one batch; return how many rows were claimed."""
        claimed = await self._claim()
        if not claimed:
            return 0
        limiter = asyncio.Semaphore(self.concurrency)
        outcomes = await asyncio.gather(*(self._send(item, limiter) for item in claimed))
        async with self.db.transaction() as session:
            now: datetime = session.info["now"]
            for item, outcome in outcomes:
                values: dict[str, object]
                if isinstance(outcome, ChannelError):
                    retry = outcome.temporary and item.attempts < MAX_ATTEMPTS
                    wait = outcome.retry_after_s or backoff_s(item.attempts)
                    values = {
                        "status": (
                            NotificationStatus.FAILED if retry else NotificationStatus.FAILED_PERMANENT
                        ).value,
                        "last_error": str(outcome)[:2000],
                        "next_attempt_at": now + timedelta(seconds=wait) if retry else None,
                    }
                    metrics.NOTIFICATIONS.labels(self.channel.name, "retry" if retry else "failed").inc()
                else:
                    values = {
                        "status": NotificationStatus.SENT.value,
                        "sent_at": now,
                        "next_attempt_at": None,
                        "provider_message_id": getattr(outcome, "provider_message_id", None),
                    }
                    metrics.NOTIFICATIONS.labels(self.channel.name, "sent").inc()
                # Only the holder of the current lease may record (a re-claimed row has more attempts).
                await session.execute(
                    update(Notification)
                    .where(
                        Notification.id == item.message.id,
                        Notification.status == NotificationStatus.SENDING.value,
                        Notification.attempts == item.attempts,
                    )
                    .values(**values)
                )
        return len(claimed)

    async def backlog(self) -> tuple[int, datetime | None]:
        """``(rows waiting, created_at of the oldest)`` among PENDING / SENDING / FAILED rows."""
        async with self.db.read() as session:
            count, oldest = (
                await session.execute(
                    select(func.count(), func.min(Notification.created_at)).where(
                        or_(*(Notification.status == s.value for s in OPEN_STATUSES))
                    )
                )
            ).one()
        metrics.NOTIFICATION_BACKLOG.set(count)
        return int(count), oldest

    async def run_forever(self, stop: asyncio.Event, *, idle_s: float = 1.0) -> None:
        """Deliver until ``stop`` is set; sleeps at most ``idle_s`` when idle, less when woken by a commit."""
        while not stop.is_set():
            self.wake.clear()  # before the claim, so a commit during the batch is not missed
            try:
                if await self.run_once() >= self.batch_size:
                    continue
            except Exception:
                log.exception("delivery batch failed")
            waiters = {asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())}
            _, pending = await asyncio.wait(waiters, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
