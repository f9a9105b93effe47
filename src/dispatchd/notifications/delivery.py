"""The delivery worker: claims due outbox rows with a lease, sends them, records the outcome (issue 3).

Claim: one transaction moves due rows (PENDING, FAILED whose retry is due, or SENDING whose lease ran
out) to SENDING with ``next_attempt_at = now + lease`` and ``attempts + 1`` (``FOR UPDATE SKIP LOCKED``
on PostgreSQL). Send: outside any transaction, every claimed row at once. Record: one transaction,
guarded by ``status = SENDING AND attempts = <ours>`` so only the current lease holder writes.

Guarantee: **at least once**. A worker killed between claim and record leaves rows SENDING; they are
claimed again when the lease ends, and may then reach the recipient twice (WhatsApp has no
client-supplied idempotency key). Our side never *creates* a duplicate: rows are written once, with the
change that causes them (or once per ``Idempotency-Key`` through the API).

Never hammering:
- each lane (phone channel, email, fallback) has a :class:`CircuitBreaker`; while it is open nothing is
  claimed, so no attempt is burned; a probe that fails gives its attempt back;
- auth failures (``opens_circuit``) are failures of the channel, not of the message: the message keeps
  its attempt and waits for the circuit to close;
- a lane drains at most ``rate`` messages (``limits`` syntax, default Meta's 80/second), in
  ``next_attempt_at`` order;
- per-recipient pacing: a phone gets at most one message per ``recipient_interval_s`` (Meta allows
  about one per 6 s to a user); later messages wait, they do not fail.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from sqlalchemy import ColumnElement, func, or_, select, true, update

from dispatchd.core import metrics
from dispatchd.core.db import Database
from dispatchd.core.logging import get_logger
from dispatchd.notifications import policy
from dispatchd.notifications.breaker import CircuitBreaker
from dispatchd.notifications.channels.base import (
    Channel,
    ChannelError,
    Classification,
    ErrorKind,
    OutboundMessage,
    SendResult,
)
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus

log = get_logger("dispatchd.notifications.delivery")


def is_email(recipient: str) -> bool:
    return "@" in recipient


@dataclass
class Lane:
    """The rows one channel sends (``where``), its breaker and its drain rate."""

    channel: Channel
    where: ColumnElement[bool]
    breaker: CircuitBreaker
    rate: str | None = "80/second"
    limiter: MovingWindowRateLimiter = field(
        default_factory=lambda: MovingWindowRateLimiter(storage_from_string("async+memory://"))
    )


@dataclass(frozen=True)
class _Claimed:
    message: OutboundMessage
    attempts: int
    expires_at: datetime | None
    payload: dict[str, Any] | None


class DeliveryWorker:
    """Sends the outbox through its lanes, at most ``concurrency`` rows per claim, all at once."""

    def __init__(
        self,
        db: Database,
        channel: Channel | None = None,
        *,
        lanes: list[Lane] | None = None,
        batch_size: int = 200,
        lease_s: float = 60.0,
        concurrency: int = 32,
        loops: int = 1,
        recipient_interval_s: float = 0.0,
        templates: Mapping[str, Mapping[str, Any]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        if lanes is None:
            assert channel is not None, "give a channel or lanes"
            lanes = [Lane(channel, true(), CircuitBreaker(channel.name, db.clock), rate=None)]
        self.lanes = lanes
        # Every claimed row is sent at once: a claim never outgrows its share of what may be in flight,
        # so no row waits for a send slot while its lease runs out (the lease must exceed the channel's
        # HTTP timeout). ``loops`` overlapping cycles share ``concurrency``.
        self.loops = max(1, loops)
        self.batch_size = max(1, min(batch_size, concurrency // self.loops))
        self.lease_s = lease_s
        self.recipient_interval_s = recipient_interval_s
        self.templates = dict(templates or {})
        self.rng = rng or random.Random()
        self.wake = asyncio.Event()
        db.after_commit.append(self._on_commit)

    @property
    def channel(self) -> Channel:
        return self.lanes[0].channel

    @property
    def breakers(self) -> list[CircuitBreaker]:
        return [lane.breaker for lane in self.lanes]

    def _on_commit(self, info: dict) -> None:
        if info.get("notifications_written"):
            self.wake.set()

    async def _capacity(self, lane: Lane) -> int:
        allowance = lane.breaker.allowance()
        if allowance == 0:
            return 0
        limit = self.batch_size if allowance is None else allowance
        if lane.rate:
            stats = await lane.limiter.get_window_stats(parse(lane.rate), lane.channel.name)
            limit = min(limit, stats.remaining)
        return limit

    async def _claim(self, lane: Lane | None = None) -> list[_Claimed]:
        lane = lane or self.lanes[0]
        limit = await self._capacity(lane)
        if limit <= 0:
            return []
        async with self.db.transaction() as session:
            now: datetime = session.info["now"]
            due = (
                select(Notification)
                .where(
                    Notification.status.in_([s.value for s in OPEN_STATUSES]),
                    Notification.next_attempt_at <= now,
                    lane.where,
                )
                .order_by(Notification.next_attempt_at, Notification.id)
                .limit(limit * 4 if self.recipient_interval_s else limit)
                .with_for_update(skip_locked=True)
            )
            rows = list((await session.scalars(due)).all())
            rows = await self._paced(session, rows, now, limit)
            claimed: list[_Claimed] = []
            for row in rows:
                if row.expires_at is not None and row.expires_at <= now:
                    row.status = NotificationStatus.EXPIRED.value
                    row.next_attempt_at = None
                    metrics.NOTIFICATIONS.labels(lane.channel.name, "expired", "").inc()
                    continue
                row.status = NotificationStatus.SENDING.value
                row.attempts += 1
                row.channel = lane.channel.name
                row.next_attempt_at = now + timedelta(seconds=self.lease_s)
                payload = dict(row.payload) if row.payload else None
                claimed.append(
                    _Claimed(
                        OutboundMessage(
                            row.id,
                            row.recipient,
                            row.category,
                            row.body,
                            payload,
                            template=(payload or {}).get("template"),
                        ),
                        row.attempts,
                        row.expires_at,
                        payload,
                    )
                )
            if claimed and lane.rate:
                for _ in claimed:
                    await lane.limiter.hit(parse(lane.rate), lane.channel.name)
            return claimed

    async def _paced(
        self, session, rows: list[Notification], now: datetime, limit: int
    ) -> list[Notification]:
        """Keep at most ``limit`` rows, at most one per phone, and none for a phone served too recently."""
        if not self.recipient_interval_s:
            return rows[:limit]
        phones = {row.recipient for row in rows if not is_email(row.recipient)}
        recent: set[str] = set()
        if phones:
            since = now - timedelta(seconds=self.recipient_interval_s)
            busy = await session.scalars(
                select(Notification.recipient)
                .where(
                    Notification.recipient.in_(phones),
                    or_(
                        Notification.sent_at > since,
                        (Notification.status == NotificationStatus.SENDING.value)
                        & (Notification.next_attempt_at > now),
                    ),
                )
                .distinct()
            )
            recent = set(busy.all())
        chosen: list[Notification] = []
        for row in rows:
            if row.recipient in recent:
                continue  # waits: pacing never fails a message
            chosen.append(row)
            if not is_email(row.recipient):
                recent.add(row.recipient)
            if len(chosen) == limit:
                break
        return chosen

    async def _send(self, lane: Lane, item: _Claimed) -> tuple[_Claimed, SendResult | ChannelError]:
        started = time.perf_counter()
        try:
            return item, await lane.channel.send(item.message)
        except ChannelError as exc:
            return item, exc
        except Exception as exc:  # an adapter bug must not lose the row: an unknown error, retried a little
            log.exception("channel raised unexpectedly", notification_id=item.message.id)
            return item, ChannelError(repr(exc), Classification(ErrorKind.UNKNOWN, "ADAPTER_ERROR"))
        finally:
            metrics.SEND_LATENCY.labels(lane.channel.name).observe(time.perf_counter() - started)

    async def run_once(self) -> int:
        """Claim, send and record one batch per lane; return how many rows were claimed."""
        total = 0
        for lane in self.lanes:
            probing = lane.breaker.is_probing or lane.breaker.allowance() == 1
            claimed = await self._claim(lane)
            if not claimed:
                continue
            total += len(claimed)
            outcomes = await asyncio.gather(*(self._send(lane, item) for item in claimed))
            await self._record(lane, outcomes, probing)
        return total

    async def _record(self, lane: Lane, outcomes, probing: bool) -> None:
        name = lane.channel.name
        async with self.db.transaction() as session:
            now: datetime = session.info["now"]
            for item, outcome in outcomes:
                if isinstance(outcome, ChannelError):
                    values = self._after_error(lane, item, outcome, now, probing)
                else:
                    lane.breaker.record(True)
                    metrics.NOTIFICATIONS.labels(name, "sent", "").inc()
                    values = {
                        "status": NotificationStatus.SENT.value,
                        "sent_at": now,
                        "next_attempt_at": None,
                        "provider_message_id": outcome.provider_message_id,
                    }
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

    def _after_error(
        self, lane: Lane, item: _Claimed, error: ChannelError, now: datetime, probing: bool
    ) -> dict[str, Any]:
        c = error.classification
        name = lane.channel.name
        common = {
            "last_error": str(error)[:2000],
            "error_code": c.code,
            "error_kind": c.kind.value,
            "failed_at": now,
        }
        if c.kind is ErrorKind.UNKNOWN:
            metrics.UNKNOWN_ERRORS.labels(name).inc()
            log.warning("unknown provider error", notification_id=item.message.id, code=c.code, raw=error.raw)
        channel_failed = c.opens_circuit or (probing and c.kind in (ErrorKind.TEMPORARY, ErrorKind.UNKNOWN))
        if channel_failed:
            # the channel is down, not this message: it keeps its attempt and waits for the circuit
            lane.breaker.record(False, opens=c.opens_circuit, reason=f"{c.code}: {error}"[:200])
            metrics.NOTIFICATIONS.labels(name, "channel_down", c.kind.value).inc()
            return {
                **common,
                "status": NotificationStatus.FAILED.value,
                "attempts": item.attempts - 1,
                "next_attempt_at": now,
            }
        lane.breaker.record(c.kind not in (ErrorKind.TEMPORARY, ErrorKind.UNKNOWN))
        if c.kind is ErrorKind.WINDOW_CLOSED:
            template = self.templates.get(item.message.category)
            if template and not item.message.template:
                metrics.NOTIFICATIONS.labels(name, "template", c.kind.value).inc()
                parameters = [item.message.body[:1000]] if template.get("body_parameter", True) else []
                payload = {**(item.payload or {}), "template": {**template, "parameters": parameters}}
                return {
                    **common,
                    "status": NotificationStatus.PENDING.value,
                    "next_attempt_at": now,
                    "payload": payload,
                }
        decision = policy.after_failure(
            item.message.category, item.attempts, c, now, item.expires_at, self.rng
        )
        outcome = {
            NotificationStatus.FAILED: "retry",
            NotificationStatus.EXPIRED: "expired",
        }.get(decision.status, "failed")
        metrics.NOTIFICATIONS.labels(name, outcome, c.kind.value).inc()
        return {**common, "status": decision.status.value, "next_attempt_at": decision.next_attempt_at}

    async def backlog(self) -> tuple[int, datetime | None]:
        """``(rows waiting, created_at of the oldest)`` among PENDING / SENDING / FAILED rows."""
        async with self.db.read() as session:
            count, oldest = (
                await session.execute(
                    select(func.count(), func.min(Notification.created_at)).where(
                        Notification.status.in_([s.value for s in OPEN_STATUSES])
                    )
                )
            ).one()
            now = session.info["now"]
        metrics.NOTIFICATION_BACKLOG.set(count)
        metrics.OLDEST_PENDING_AGE.set((now - oldest).total_seconds() if oldest else 0)
        return int(count), oldest

    async def run_forever(self, stop: asyncio.Event, *, idle_s: float = 1.0) -> None:
        """Deliver until ``stop`` is set, with ``loops`` claim → send → record cycles overlapping (so one
        slow send or one recording does not hold every other message); each loop sleeps at most
        ``idle_s`` when idle, less when woken by a commit."""
        await asyncio.gather(*(self._loop(stop, idle_s) for _ in range(self.loops)))

    async def _loop(self, stop: asyncio.Event, idle_s: float) -> None:
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
