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
  backoff (:data:`ROUTING_POLICY`: 1 s, 2 s, 4 s… capped at 60 s, 6 attempts), then FAILED.

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
from dispatchd.core.db import Database, retry_transient
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
ROUTING_POLICY = RetryPolicy("inbound_routing", base_s=1.0, cap_s=60.0, max_attempts=6, jitter=0.2)

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
    for message in sorted(messages, key=lambda message: message.wamid):
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
            async with session.begin_nested():
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
        how many were claimed."""
        handled = 0
        while handled < limit and await self._route_one(db, None):
            handled += 1
        return handled

    async def route(self, db: Database, inbound_ids: Sequence[str]) -> None:
        """Route these just-stored messages now (the webhook's fast path). A row another instance or the
        sweeper holds is skipped; an error is logged and left to the sweeper."""
        for inbound_id in inbound_ids:
            try:
                await self._route_one(db, inbound_id)
            except Exception:
                log.exception(
                    "routing an inbound message failed; the sweeper retries it", inbound_id=inbound_id
                )

    async def oldest_due(self, session: AsyncSession, now: datetime) -> datetime | None:
        return await session.scalar(select(func.min(InboundMessage.next_attempt_at)).where(due(now)))

    @retry_transient
    async def _route_one(self, db: Database, inbound_id: str | None) -> bool:
        """Claim one due message (this one, when given) and route it; False when there is none."""
        async with db.transaction() as session:
            now: datetime = session.info["now"]
            query = select(InboundMessage).where(due(now))
            if inbound_id is not None:
                query = query.where(InboundMessage.id == inbound_id)
            query = (
                query.order_by(InboundMessage.next_attempt_at, InboundMessage.id)
                .limit(1)
                .with_for_update(skip_locked=True, key_share=True)
            )
            row = await session.scalar(query)
            if row is None:
                return False
            row.attempts += 1
            message = _view(row)
            try:
                async with session.begin_nested():
                    taken = await self._offer(session, message)
            except Exception as exc:  # the handler's work is rolled back; the claim commits the failure
                self._failed(row, exc, now)
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
        else:
            row.next_attempt_at = now + timedelta(seconds=ROUTING_POLICY.delay_s(row.attempts, self._rng))
        log.exception(
            "an inbound handler failed",
            inbound_id=row.id,
            attempts=row.attempts,
            routing_status=row.routing_status,
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
