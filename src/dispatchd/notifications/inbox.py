"""The inbound inbox: every WhatsApp message received is stored once, then routed to a domain as work
on its row, so that no reply is ever lost between the two steps.

* The webhook stores a new message (one row per provider id: Meta re-delivers) as PENDING, due now,
  in the transaction that answers Meta. It then routes it at once; if the process dies first, the
  sweeper's ``inbound_routing`` deadline finds the row due and routes it (a re-delivery by Meta is a
  duplicate and is only acknowledged).
* Routing claims one due row (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so instances share the work)
  and offers it to the registered :class:`~dispatchd.core.inbound.InboundHandler` s in order, inside
  the claim's transaction: the first that returns an outcome takes it (ROUTED, with handler and
  outcome); if none does, it is UNROUTED and stays for an operator (``GET /v1/inbound``).
* A handler that raises rolls back its own work (a savepoint); the row is retried with exponential
  backoff (:data:`ROUTING_POLICY`: 1 s, 2 s, 4 s… 32 s, 60 s: FAILED after the 8th attempt, about
  2 min after the first). A failure of the whole routing transaction is recorded the same way.

Lock order: the inbound row first, then whatever the handler locks (bookings, offers, drivers…).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import metrics
from dispatchd.core.db import Database, is_transient, lock_for_update, retry_transient, savepoint
from dispatchd.core.errors import InvalidState
from dispatchd.core.ids import new_id
from dispatchd.core.inbound import Inbound, InboundHandler
from dispatchd.core.logging import get_logger
from dispatchd.core.rows import get_or_404
from dispatchd.core.sweeper import INBOUND, Deadline
from dispatchd.notifications.models import InboundMessage, RoutingStatus
from dispatchd.notifications.policy import RetryPolicy

log = get_logger("dispatchd.inbox")

#: Backoff of a failed routing: a handler's bug or a database hiccup, not a provider's rate limit.
ROUTING_POLICY = RetryPolicy("inbound_routing", base_s=1.0, cap_s=60.0, max_attempts=8, jitter=0.2)

_ID_MAX = 200  # provider_message_id, button_id, context_message_id columns
_ERROR_MAX = 2000


@dataclass(frozen=True)
class Received:
    """One parsed inbound message, before it is stored (see ``webhook_parsing``)."""

    wamid: str
    from_phone: str
    type: str
    text: str | None
    button_id: str | None
    context_message_id: str | None
    sent_at: datetime | None
    raw: dict[str, Any]


def due(now: datetime) -> ColumnElement[bool]:
    """The rows routing must act on at ``now``: PENDING, due. Used by the claim and the lag report."""
    return (InboundMessage.routing_status == RoutingStatus.PENDING.value) & (
        InboundMessage.next_attempt_at <= now
    )


async def store(session: AsyncSession, messages: Sequence[Received]) -> tuple[list[str], int]:
    """Store the messages not seen before as PENDING, due now. Returns ``(new row ids, duplicates)``:
    a provider id already stored (a re-delivery, or a concurrent delivery that committed first) is a
    duplicate and changes nothing."""
    wamids = sorted({message.wamid for message in messages})
    known: set[str] = set()
    for start in range(0, len(wamids), 500):
        chunk = wamids[start : start + 500]
        rows = await session.scalars(
            select(InboundMessage.provider_message_id).where(InboundMessage.provider_message_id.in_(chunk))
        )
        known.update(rows.all())
    now: datetime = session.info["now"]
    stored: list[str] = []
    duplicates = 0
    for message in messages:  # the delivery's order: a sender's messages are routed as they were sent
        if message.wamid in known:
            duplicates += 1
            continue
        known.add(message.wamid)
        row = InboundMessage(
            id=new_id("inb"),
            provider_message_id=message.wamid,
            from_phone=message.from_phone,
            type=message.type,
            text=message.text,
            button_id=message.button_id[:_ID_MAX] if message.button_id else None,
            context_message_id=message.context_message_id[:_ID_MAX] if message.context_message_id else None,
            sent_at=message.sent_at,
            received_at=now,
            raw=message.raw,
            routing_status=RoutingStatus.PENDING.value,
            attempts=0,
            next_attempt_at=now,
        )
        try:
            async with savepoint(session):
                session.add(row)
                await session.flush()
        except IntegrityError:  # a concurrent delivery of the same message committed first
            duplicates += 1
            continue
        stored.append(row.id)
    return stored, duplicates


def _view(row: InboundMessage) -> Inbound:
    return Inbound(
        id=row.id,
        from_phone=row.from_phone,
        type=row.type,
        text=row.text,
        button_id=row.button_id,
        context_message_id=row.context_message_id,
        sent_at=row.sent_at,
        received_at=row.received_at,
    )


class Inbox:
    """Routes stored inbound messages to ``handlers`` (a list the assembly fills from every domain, in
    order; it is read at each routing, so handlers registered after construction count)."""

    def __init__(self, handlers: list[InboundHandler] | None = None, *, rng: random.Random | None = None):
        self.handlers = handlers if handlers is not None else []
        self._rng = rng or random.Random()

    def deadline(self) -> Deadline:
        return Deadline("inbound_routing", self.route_due, self.oldest_due, phase=INBOUND)

    async def route_due(self, db: Database, limit: int) -> int:
        """The sweeper's deadline: route at most ``limit`` due messages, one transaction each. Returns
        how many were claimed (a message whose routing failed counts: its attempt is recorded)."""
        handled = 0
        while handled < limit and await self._route_one(db, None):
            handled += 1
        return handled

    async def route(self, db: Database, inbound_ids: Sequence[str]) -> None:
        """Route these just-stored messages now (the webhook's fast path), in order. A row another
        instance or the sweeper holds is skipped; a failure is recorded on the row for the sweeper."""
        for inbound_id in inbound_ids:
            try:
                await self._route_one(db, inbound_id)
            except Exception:  # the database itself failed: the row is still due, the sweeper retries
                log.exception("routing an inbound message failed", inbound_id=inbound_id)

    async def oldest_due(self, session: AsyncSession, now: datetime) -> datetime | None:
        return await session.scalar(select(func.min(InboundMessage.next_attempt_at)).where(due(now)))

    async def _route_one(self, db: Database, inbound_id: str | None) -> bool:
        """Claim one due message (this one, when given) and route it; False when there is none.

        A failure of the whole routing transaction (not only of a handler: an event that cannot be
        stored, a value too long for its column…) is recorded on the row in a transaction of its own,
        so that one poison message never blocks the ones behind it."""
        claimed: list[str] = []
        try:
            return await self._claim_and_route(db, inbound_id, claimed)
        except Exception as exc:
            if not claimed:
                raise
            await self._record_failure(db, claimed[-1], exc)
            return True

    @retry_transient
    async def _claim_and_route(self, db: Database, inbound_id: str | None, claimed: list[str]) -> bool:
        async with db.transaction() as session:
            now: datetime = session.info["now"]
            query = select(InboundMessage).where(due(now))
            if inbound_id is not None:
                query = query.where(InboundMessage.id == inbound_id)
            query = (
                # received order: what a sender wrote first is routed first
                query.order_by(InboundMessage.next_attempt_at, InboundMessage.sent_at, InboundMessage.id)
                .limit(1)
                .with_for_update(skip_locked=True, key_share=True)
            )
            row = await session.scalar(query)
            if row is None:
                return False
            claimed.append(row.id)
            row.attempts += 1
            message = _view(row)
            try:
                async with savepoint(session):
                    taken = await self._offer(session, message)
            except Exception as exc:
                if is_transient(exc):  # a deadlock: re-run the whole claim, as any unit of work
                    raise
                self._failed(row, exc, now)  # the handler's work is rolled back; its failure commits
                return True
            row.next_attempt_at = None
            row.routed_at = now
            row.last_error = None
            if taken is None:
                row.routing_status = RoutingStatus.UNROUTED.value
                metrics.INBOUND_ROUTED.labels("unrouted").inc()
            else:
                row.routing_status = RoutingStatus.ROUTED.value
                row.handler, row.outcome = taken
                metrics.INBOUND_ROUTED.labels(taken[0]).inc()
            log.info(
                "inbound message routed",
                inbound_id=row.id,
                handler=row.handler,
                outcome=row.outcome,
                routing_status=row.routing_status,
            )
            return True

    @retry_transient
    async def _record_failure(self, db: Database, inbound_id: str, exc: Exception) -> None:
        async with db.transaction() as session:
            row = await session.scalar(
                lock_for_update(
                    select(InboundMessage)
                    .where(InboundMessage.id == inbound_id)
                    .execution_options(populate_existing=True)
                )
            )
            if row is None or row.routing_status != RoutingStatus.PENDING.value:
                return
            row.attempts += 1
            self._failed(row, exc, session.info["now"])

    async def _offer(self, session: AsyncSession, message: Inbound) -> tuple[str, str] | None:
        for handler in self.handlers:
            outcome = await handler.route(session, message)
            if outcome is not None:
                return handler.name, outcome[:200]
        return None

    def _failed(self, row: InboundMessage, exc: Exception, now: datetime) -> None:
        row.last_error = f"{type(exc).__name__}: {exc}"[:_ERROR_MAX]
        if row.attempts >= ROUTING_POLICY.max_attempts:
            row.routing_status = RoutingStatus.FAILED.value
            row.next_attempt_at = None
            metrics.INBOUND_ROUTED.labels("failed").inc()
            # the traceback once, when routing gives up; each retry before is one warning line
            log.exception(
                "routing an inbound message failed for good", inbound_id=row.id, attempts=row.attempts
            )
            return
        row.next_attempt_at = now + timedelta(seconds=ROUTING_POLICY.delay_s(row.attempts, self._rng))
        log.warning(
            "routing an inbound message failed; retrying",
            inbound_id=row.id,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at.isoformat(),
            error=type(exc).__name__,
        )


async def retry(session: AsyncSession, inbound_id: str, now: datetime) -> InboundMessage:
    """An operator's retry: a FAILED or UNROUTED message is PENDING again, due now, with a fresh count.
    Raises :class:`~dispatchd.core.errors.NotFound` (INBOUND_MESSAGE_NOT_FOUND) and
    :class:`~dispatchd.core.errors.InvalidState` for a message ROUTED or already PENDING."""
    row = await get_or_404(
        session,
        InboundMessage,
        inbound_id,
        code="INBOUND_MESSAGE_NOT_FOUND",
        what="inbound message",
        lock=True,
    )
    if row.routing_status not in (RoutingStatus.FAILED.value, RoutingStatus.UNROUTED.value):
        raise InvalidState(f"inbound message {inbound_id} is {row.routing_status}; only FAILED or UNROUTED")
    row.routing_status = RoutingStatus.PENDING.value
    row.attempts = 0
    row.next_attempt_at = now
    return row
