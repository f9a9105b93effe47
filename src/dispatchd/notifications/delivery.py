"""The delivery worker: claims due outbox rows with a lease, sends them, records the outcome (issue 3, 7).

Claim (:mod:`dispatchd.notifications.claim`): one transaction moves due rows (PENDING, FAILED whose
retry is due, or SENDING whose lease ran out) to SENDING with ``next_attempt_at = now + lease`` and
``attempts + 1`` (``FOR UPDATE SKIP LOCKED`` on PostgreSQL). Send: outside any transaction, every
claimed row at once. Record: one transaction, guarded by ``status = SENDING AND attempts = <ours>``
so only the current lease holder writes. Batched (issue 11): a claim of N rows is one ``SELECT … FOR
UPDATE SKIP LOCKED`` and one ``UPDATE``; the outcomes of N sends are one ``UPDATE … FROM (VALUES …)
RETURNING`` for the sent rows and one for the others.

Guarantee: **at least once**. A worker killed between claim and record leaves rows SENDING; they are
claimed again when the lease ends, and may then reach the recipient twice (WhatsApp has no
client-supplied idempotency key). Our side never *creates* a duplicate: rows are written once, with the
change that causes them (or once per ``Idempotency-Key`` through the API).

Order at a peak (DESIGN.md "The outbox at a real peak"):
- claims go by ``priority`` first (admin alerts, then customers, then driver offers, then notices), then
  by ``next_attempt_at``: a customer is never behind a broadcast;
- per-recipient pacing: a phone gets at most one message per ``recipient_interval_s`` (Meta allows
  about one per 6 s to a user). The claim query leaves out phones whose slot is taken
  (:mod:`dispatchd.notifications.pacing`), so paced rows never hold the head of the queue; they wait,
  they do not fail;
- coalescing: when a phone's slot comes, the open rows of a category that has a *coalescer* (driver
  offers) go out as one message built by it; the rows it carries are recorded with the carrier's outcome;
- expiry is a deadline: :class:`dispatchd.notifications.expiry.OutboxExpiry` (run by the sweeper) expires
  every row past ``expires_at`` in bulk, and a claim never takes one.

Never hammering:
- each lane (phone channel, email, fallback) has a :class:`CircuitBreaker`; while it is open nothing is
  claimed, so no attempt is burned; a probe that fails gives its attempt back;
- auth failures (``opens_circuit``) are failures of the channel, not of the message: the message keeps
  its attempt and waits for the circuit to close;
- a lane drains at most ``rate`` messages (``limits`` syntax, default Meta's 80/second).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    Text,
    case,
    column,
    func,
    literal,
    null,
    text,
    true,
    update,
)
from sqlalchemy import (
    values as values_of,
)
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, metrics, topics
from dispatchd.core.db import Database, retry_transient
from dispatchd.core.logging import get_logger
from dispatchd.core.types import UTCDateTime
from dispatchd.notifications import claim, pacing, policy
from dispatchd.notifications.breaker import CircuitBreaker
from dispatchd.notifications.channels.base import (
    Channel,
    ChannelError,
    Classification,
    ErrorKind,
    SendResult,
)
from dispatchd.notifications.claim import Claimed, Member, current_lease
from dispatchd.notifications.models import Notification, NotificationStatus
from dispatchd.notifications.outbox import Coalescer

log = get_logger("dispatchd.notifications.delivery")

#: Meta's pair rate limit ("too many messages to this user"): Cloud API error 131056.
PAIR_RATE_LIMIT = "META_131056"


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


def _unless_cancelled(values: dict[str, Any]) -> dict[str, Any]:
    """The new state of a row whose send did not succeed, or CANCELLED when a change made it moot while it
    was in flight (``cancel_reason`` set by :func:`dispatchd.notifications.outbox.cancel`)."""
    moot = Notification.cancel_reason.is_not(None)
    guarded = {**values, "status": case((moot, NotificationStatus.CANCELLED.value), else_=values["status"])}
    after = values.get("next_attempt_at")
    if after is not None:
        column_type = Notification.__table__.c.next_attempt_at.type
        guarded["next_attempt_at"] = case((moot, null()), else_=literal(after, column_type))
    return guarded


# On PostgreSQL each outcome statement is one text with one array per column (``unnest``): the same SQL
# whatever the batch, so it is compiled and prepared once; a VALUES list of N rows is a new statement to
# compile for every batch (it was a tenth of a worker's CPU in the flame graph).
_PG_SENT_ARRAYS = ("ids", "leases", "sent_ats", "wamids", "carriers")
_PG_RECORD_SENT = text(
    """
    UPDATE notifications AS n
    SET status = 'SENT', sent_at = v.sent_at, next_attempt_at = NULL, provider_message_id = v.wamid,
        carried_by = v.carried_by
    FROM unnest(CAST(:ids AS varchar[]), CAST(:leases AS integer[]), CAST(:sent_ats AS timestamptz[]),
                CAST(:wamids AS varchar[]), CAST(:carriers AS varchar[]))
         AS v(id, lease, sent_at, wamid, carried_by)
    WHERE n.id = v.id AND n.status = 'SENDING' AND n.attempts = v.lease
    RETURNING n.id
    """
)
_PG_UNSENT_ARRAYS = (
    "ids",
    "leases",
    "statuses",
    "next_ats",
    "attempts",
    "last_errors",
    "error_codes",
    "error_kinds",
    "failed_ats",
)
_PG_RECORD_UNSENT = text(
    """
    UPDATE notifications AS n
    SET status = CASE WHEN n.cancel_reason IS NOT NULL THEN 'CANCELLED' ELSE v.status END,
        next_attempt_at = CASE WHEN n.cancel_reason IS NOT NULL THEN NULL ELSE v.next_at END,
        attempts = v.attempts,
        last_error = COALESCE(v.last_error, n.last_error),
        error_code = COALESCE(v.error_code, n.error_code),
        error_kind = COALESCE(v.error_kind, n.error_kind),
        failed_at = COALESCE(v.failed_at, n.failed_at)
    FROM unnest(CAST(:ids AS varchar[]), CAST(:leases AS integer[]), CAST(:statuses AS varchar[]),
                CAST(:next_ats AS timestamptz[]), CAST(:attempts AS integer[]), CAST(:last_errors AS text[]),
                CAST(:error_codes AS varchar[]), CAST(:error_kinds AS varchar[]),
                CAST(:failed_ats AS timestamptz[]))
         AS v(id, lease, status, next_at, attempts, last_error, error_code, error_kind, failed_at)
    WHERE n.id = v.id AND n.status = 'SENDING' AND n.attempts = v.lease
    RETURNING n.id
    """
)


def _arrays(names: tuple[str, ...], rows: list[tuple]) -> dict[str, list]:
    """Rows of values as one list per column, named as the ``unnest`` statement's parameters."""
    return {name: list(values) for name, values in zip(names, zip(*rows, strict=True), strict=True)}


_SENT_COLUMNS = (
    column("id", String),
    column("lease", Integer),
    column("sent_at", UTCDateTime()),
    column("wamid", String),
    column("carried_by", String),
)


async def record_sent(session: AsyncSession, sent: list[dict[str, Any]]) -> set[str]:
    """Mark many rows SENT in one ``UPDATE … FROM (VALUES …) RETURNING``; return the ids written (those
    whose lease is still held). ``sent`` rows: ``b_id``, ``b_attempts`` (the lease), ``b_sent_at`` (UTC),
    ``b_wamid`` (the provider's message id) and ``b_carried_by`` (the carrier's id, or None)."""
    if not sent:
        return set()
    data = [
        (row["b_id"], row["b_attempts"], row["b_sent_at"], row["b_wamid"], row["b_carried_by"])
        for row in sent
    ]
    if session.bind.dialect.name == "postgresql":
        written = await session.execute(_PG_RECORD_SENT, _arrays(_PG_SENT_ARRAYS, data))
        return set(written.scalars().all())
    v = values_of(*_SENT_COLUMNS, name="sent").data(data).cte("sent")
    table = Notification.__table__
    statement = (
        table.update()
        .where(
            table.c.id == v.c.id,
            table.c.status == NotificationStatus.SENDING.value,
            table.c.attempts == v.c.lease,
        )
        .values(
            status=NotificationStatus.SENT.value,
            sent_at=v.c.sent_at,
            next_attempt_at=None,
            provider_message_id=v.c.wamid,
            carried_by=v.c.carried_by,
        )
        .returning(table.c.id)
    )
    return set((await session.execute(statement)).scalars().all())


_UNSENT_COLUMNS = (
    column("id", String),
    column("lease", Integer),
    column("status", String),
    column("next_at", UTCDateTime()),
    column("attempts", Integer),
    column("last_error", Text),
    column("error_code", String),
    column("error_kind", String),
    column("failed_at", UTCDateTime()),
)


async def record_unsent(session: AsyncSession, changes: list[tuple[Member, dict[str, Any]]]) -> set[str]:
    """Write the outcome of many sends that did not succeed in one ``UPDATE … FROM (VALUES …) RETURNING``;
    return the ids written (those whose lease ``member.attempts`` is still held).

    Each change's ``values`` hold ``status``, ``next_attempt_at`` (UTC or None) and, for a failed send,
    ``last_error``, ``error_code``, ``error_kind``, ``failed_at`` (kept as they were when absent) and
    ``attempts`` (given back when the failure was the channel's or the pacing's; else unchanged). A row made
    moot while in flight (``cancel_reason``) becomes CANCELLED instead, with no next attempt."""
    if not changes:
        return set()
    rows = [
        (
            member.id,
            member.attempts,
            values["status"],
            values.get("next_attempt_at"),
            values.get("attempts", member.attempts),
            values.get("last_error"),
            values.get("error_code"),
            values.get("error_kind"),
            values.get("failed_at"),
        )
        for member, values in changes
    ]
    if session.bind.dialect.name == "postgresql":
        written = await session.execute(_PG_RECORD_UNSENT, _arrays(_PG_UNSENT_ARRAYS, rows))
        return set(written.scalars().all())
    v = values_of(*_UNSENT_COLUMNS, name="outcome").data(rows).cte("outcome")
    table = Notification.__table__

    moot = table.c.cancel_reason.is_not(None)
    statement = (
        table.update()
        .where(
            table.c.id == v.c.id,
            table.c.status == NotificationStatus.SENDING.value,
            table.c.attempts == v.c.lease,
        )
        .values(
            status=case((moot, NotificationStatus.CANCELLED.value), else_=v.c.status),
            next_attempt_at=case((moot, null()), else_=v.c.next_at),
            attempts=v.c.attempts,
            last_error=func.coalesce(v.c.last_error, table.c.last_error),
            error_code=func.coalesce(v.c.error_code, table.c.error_code),
            error_kind=func.coalesce(v.c.error_kind, table.c.error_kind),
            failed_at=func.coalesce(v.c.failed_at, table.c.failed_at),
        )
        .returning(table.c.id)
    )
    return set((await session.execute(statement)).scalars().all())


class DeliveryWorker:
    """Sends the outbox through its lanes, at most ``concurrency`` messages per claim, all at once.

    ``coalescers`` maps a category to the function that merges a paced recipient's open rows of that
    category into one message (the domain that writes them provides it)."""

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
        coalescers: Mapping[str, Coalescer] | None = None,
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
        # kept by reference: the assembly adds every domain's coalescers after the worker is built
        self.coalescers = coalescers if coalescers is not None else {}
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

    # ------------------------------------------------------------------------------------------ claim

    async def _claim(self, lane: Lane | None = None) -> list[Claimed]:
        """Take up to the lane's capacity of messages (:func:`dispatchd.notifications.claim.claim`)."""
        lane = lane or self.lanes[0]
        limit = await self._capacity(lane)
        if limit <= 0:
            return []
        return await claim.claim(
            self.db,
            lane,
            limit,
            lease_s=self.lease_s,
            recipient_interval_s=self.recipient_interval_s,
            coalescers=self.coalescers,
        )

    # ------------------------------------------------------------------------------------- send, record

    async def _send(self, lane: Lane, item: Claimed) -> tuple[Claimed, SendResult | ChannelError | None]:
        """Send one claimed message; ``None`` when every row it carries expired since the claim (a busy
        process may take a moment between claim and send): it is then not sent at all, never late."""
        now = self.db.clock.now()
        if all(member.expires_at is not None and member.expires_at <= now for member in item.members):
            return item, None
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
        """Claim, send and record one batch per lane; return how many messages were claimed."""
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
        """Decide each outcome once (breaker, metrics), then write them all in one transaction."""
        name = lane.channel.name
        now = self.db.clock.now()
        changes: list[tuple[Member, dict[str, Any]]] = []
        sent: list[dict[str, Any]] = []
        counts: Counter[tuple[str, str]] = Counter()
        for item, outcome in outcomes:
            if outcome is None:
                counts["expired", ""] += len(item.members)
                expired = {"status": NotificationStatus.EXPIRED.value, "next_attempt_at": None}
                changes += [(member, expired) for member in item.members]
            elif isinstance(outcome, ChannelError):
                changes += self._after_error(lane, item, outcome, now, probing, counts)
            else:
                lane.breaker.record(True)
                counts["sent", ""] += len(item.members)
                sent += [
                    {
                        "b_id": member.id,
                        "b_attempts": member.attempts,
                        "b_sent_at": now,
                        "b_wamid": outcome.provider_message_id,
                        "b_carried_by": None if member.id == item.message.id else item.message.id,
                    }
                    for member in item.members
                ]
        for (outcome_name, kind), count in counts.items():
            metrics.NOTIFICATIONS.labels(name, outcome_name, kind).inc(count)
        called = {item.message.recipient for item, outcome in outcomes if outcome is not None}
        skipped = {item.message.recipient for item, outcome in outcomes if outcome is None} - called
        await self._write_outcomes(changes, sent, called, skipped, now)

    @retry_transient
    async def _write_outcomes(
        self,
        changes: list[tuple[Member, dict[str, Any]]],
        sent: list[dict[str, Any]],
        called: set[str],
        skipped: set[str],
        now: datetime,
    ) -> None:
        """One transaction, safe to repeat after a deadlock: every row write is guarded by the lease. The
        sent rows are one ``UPDATE … FROM (VALUES …) RETURNING`` (:func:`record_sent`), the others another
        (:func:`record_unsent`), whatever their outcomes; only rows written are announced; a re-send as a
        template (its new payload) is written alone. The phones called get their next slot
        ``recipient_interval_s`` after the provider's answer (Meta counts from its acceptance); the phones
        whose message was not sent get theirs back at once."""
        async with self.db.transaction() as session:
            batched = [(member, values) for member, values in changes if "payload" not in values]
            written = await record_unsent(session, batched)
            for member, values in changes:
                if "payload" in values:
                    result = await session.execute(
                        current_lease(update(Notification), member).values(**_unless_cancelled(values))
                    )
                    if result.rowcount:
                        written.add(member.id)
            for member, values in changes:
                event_type = _DELIVERY_EVENTS.get(values["status"])
                if (
                    member.id in written and event_type and "attempts" not in values
                ):  # not paced, not channel down
                    events.append(session, topics.NOTIFICATIONS, event_type, _failure(member, values))
            delivered = await record_sent(session, sent)
            if delivered:
                events.append(
                    session,
                    topics.NOTIFICATIONS,
                    "NotificationsSent",
                    {"ids": [row["b_id"] for row in sent if row["b_id"] in delivered]},
                )
            if self.recipient_interval_s:
                await pacing.set_next_slots(
                    session, called, now + timedelta(seconds=self.recipient_interval_s)
                )
                await pacing.set_next_slots(session, skipped, now)

    def _after_error(
        self,
        lane: Lane,
        item: Claimed,
        error: ChannelError,
        now: datetime,
        probing: bool,
        counts: Counter[tuple[str, str]],
    ) -> list[tuple[Member, dict[str, Any]]]:
        """The breaker and metrics (``counts``: outcome and error kind → rows) for one failed send, and
        each carried row's next state."""
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
        if c.code == PAIR_RATE_LIMIT:
            # Meta refused only because this phone got a message too recently: not a failure of the
            # message nor of the channel. It keeps its attempt and waits for the phone's next slot.
            counts["paced", c.kind.value] += len(item.members)
            return [
                (
                    member,
                    {
                        **common,
                        "status": NotificationStatus.FAILED.value,
                        "attempts": member.attempts - 1,
                        "next_attempt_at": now + timedelta(seconds=self.recipient_interval_s or 6.0),
                    },
                )
                for member in item.members
            ]
        channel_failed = c.opens_circuit or (probing and c.kind in (ErrorKind.TEMPORARY, ErrorKind.UNKNOWN))
        if channel_failed:
            # the channel is down, not this message: it keeps its attempt and waits for the circuit
            lane.breaker.record(False, opens=c.opens_circuit, reason=f"{c.code}: {error}"[:200])
            counts["channel_down", c.kind.value] += len(item.members)
            return [
                (
                    member,
                    {
                        **common,
                        "status": NotificationStatus.FAILED.value,
                        "attempts": member.attempts - 1,
                        "next_attempt_at": now,
                    },
                )
                for member in item.members
            ]
        lane.breaker.record(c.kind not in (ErrorKind.TEMPORARY, ErrorKind.UNKNOWN))
        return [
            (member, {**common, **self._next_state(item, member, c, now, counts)}) for member in item.members
        ]

    def _next_state(
        self,
        item: Claimed,
        member: Member,
        c: Classification,
        now: datetime,
        counts: Counter[tuple[str, str]],
    ) -> dict[str, Any]:
        category = item.message.category
        if c.kind is ErrorKind.WINDOW_CLOSED:
            template = self.templates.get(category)
            if template and not (member.payload or {}).get("template"):
                counts["template", c.kind.value] += 1
                parameters = [member.body[:1000]] if template.get("body_parameter", True) else []
                payload = {**(member.payload or {}), "template": {**template, "parameters": parameters}}
                return {
                    "status": NotificationStatus.PENDING.value,
                    "next_attempt_at": now,
                    "payload": payload,
                }
        decision = policy.after_failure(category, member.attempts, c, now, member.expires_at, self.rng)
        outcome = {
            NotificationStatus.FAILED: "retry",
            NotificationStatus.EXPIRED: "expired",
        }.get(decision.status, "failed")
        counts[outcome, c.kind.value] += 1
        return {"status": decision.status.value, "next_attempt_at": decision.next_attempt_at}

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


#: the ``notifications`` topic's event for each state a failed send leaves a row in (a sent batch is one
#: ``NotificationsSent`` event; messages made moot are not announced, their cause is)
_DELIVERY_EVENTS = {
    NotificationStatus.FAILED.value: "NotificationFailed",
    NotificationStatus.FAILED_PERMANENT.value: "NotificationFailedPermanently",
    NotificationStatus.EXPIRED.value: "NotificationExpired",
}


def _failure(member: Member, values: dict[str, Any]) -> dict[str, Any]:
    next_attempt_at = values.get("next_attempt_at")
    return {
        "id": member.id,
        "status": values["status"],
        "attempts": member.attempts,
        "error_code": values.get("error_code"),
        "error_kind": values.get("error_kind"),
        "next_attempt_at": next_attempt_at.isoformat() if next_attempt_at else None,
    }
