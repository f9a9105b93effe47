"""Dispatcher statistics (seed 001) over a time range ``[start, end)``: assignments per agent, time to
assign, time to first reply, reassignments by reason, and the pending peak.

Sources:

* assignments and reassignments: the ``ConversationAssigned`` and ``ConversationReassigned`` events of
  the ``conversation:<id>`` topics written in the range (the copy of ``ConversationAssigned`` on the
  agent's topic is not counted twice). An assignment is one of these events naming an agent; a
  reassignment is any ``ConversationReassigned`` (to an agent or to pending), grouped by its ``reason``.
  A reply timeout that found nobody else and kept the agent writes no event, so it is not counted here
  (it is in the Prometheus counter, reason ``no agent reply (kept)``);
* time to assign (``first_assigned_at − opened_at``) and time to first reply (``first_reply_at −
  opened_at``), in seconds: the conversations first assigned (first answered) within the range;
* the pending peak: the most conversations PENDING at once within the range, replayed from the events
  in id (commit) order. A ``ConversationPending`` event enters the pending state; the next
  ``ConversationAssigned``, ``ConversationReassigned`` naming an agent, or ``ConversationClosed`` of the
  same conversation leaves it. The level at ``start`` is what was pending then: conversations still
  PENDING now whose ``pending_since`` is before ``start``, and those whose first event after ``start``
  leaves the pending state (a ``ConversationAssigned`` of a conversation not opened in the range, a
  ``ConversationReassigned`` with no previous agent, a ``ConversationClosed`` with no agent). Event
  times are those of their transaction's start, so a transaction that straddles ``start`` or ``end``
  may be counted on either side: the figure is exact up to the events of the edges.

Cost: one scan of the event log from ``start`` to now (the log has no index on ``created_at``) and two
range reads of ``conversations``. Meant for an admin screen, not for a hot path.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from dispatchd.core import topics
from dispatchd.core.db import Database
from dispatchd.core.events import Event
from dispatchd.core.stats import percentile
from dispatchd.dispatcher.models import Agent, Conversation, ConversationStatus

OPENED = "ConversationOpened"
PENDING = "ConversationPending"
ASSIGNED = "ConversationAssigned"
REASSIGNED = "ConversationReassigned"
CLOSED = "ConversationClosed"
_TYPES = (OPENED, PENDING, ASSIGNED, REASSIGNED, CLOSED)


def _percentiles(values: list[float]) -> dict[str, Any]:
    def rounded(q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 3)

    return {"count": len(values), "p50": rounded(50), "p95": rounded(95)}


def _durations(rows: list[tuple[datetime, datetime]]) -> list[float]:
    return [max(0.0, (later - opened).total_seconds()) for opened, later in rows]


def _leaves_pending(type_: str, agent_id: str | None) -> bool:
    """Whether this event ends a pending state (if the conversation was pending)."""
    return type_ in (ASSIGNED, CLOSED) or (type_ == REASSIGNED and agent_id is not None)


def _was_pending_before(type_: str, agent_id: str | None, previous_agent_id: str | None) -> bool:
    """For the first event of a conversation after ``start``: whether it proves the conversation was
    pending just before (see the module doc)."""
    if type_ == ASSIGNED:
        return True  # no previous agent and no reason: it was PENDING (a new one has OPENED first)
    if type_ == REASSIGNED:
        return agent_id is not None and previous_agent_id is None  # a transfer of a pending one
    if type_ == CLOSED:
        return agent_id is None  # a pending conversation has no agent
    return False


def pending_peak(
    events: list[tuple[str, str, datetime, str | None, str | None]],
    pending_before: set[str],
    end: datetime,
) -> dict[str, Any]:
    """``events``: ``(conversation id, type, created_at, agent_id, previous_agent_id)`` from ``start``
    on, in id order (later than ``end`` too: they tell what was pending at ``start``);
    ``pending_before``: conversations PENDING now and since before ``start``. Pure."""
    at_start = set(pending_before)
    seen: set[str] = set()
    for conversation_id, type_, _, agent_id, previous in events:
        if conversation_id in seen:
            continue
        seen.add(conversation_id)
        if _was_pending_before(type_, agent_id, previous):
            at_start.add(conversation_id)
    waiting = set(at_start)
    peak, peak_at = len(waiting), None
    for conversation_id, type_, created_at, agent_id, _ in events:
        if created_at >= end:
            break
        if type_ == PENDING:
            waiting.add(conversation_id)
        elif _leaves_pending(type_, agent_id):
            waiting.discard(conversation_id)
        if len(waiting) > peak:
            peak, peak_at = len(waiting), created_at
    return {"at_start": len(at_start), "peak": peak, "peak_at": peak_at}


async def dispatcher_stats(db: Database, start: datetime, end: datetime) -> dict[str, Any]:
    """The dispatcher's figures over ``[start, end)`` (UTC); see the module doc for each one."""
    prefix = topics.conversation("")
    async with db.read() as session:
        rows = (
            await session.execute(
                select(
                    Event.topic,
                    Event.type,
                    Event.created_at,
                    Event.data["agent_id"].as_string(),
                    Event.data["previous_agent_id"].as_string(),
                    Event.data["reason"].as_string(),
                )
                .where(
                    Event.created_at >= start,
                    Event.type.in_(_TYPES),
                    Event.topic.like(prefix + "%"),
                )
                .order_by(Event.id)
            )
        ).all()
        pending_before = set(
            (
                await session.scalars(
                    select(Conversation.id).where(
                        Conversation.status == ConversationStatus.PENDING.value,
                        Conversation.pending_since < start,
                    )
                )
            ).all()
        )
        pending_now = await session.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.status == ConversationStatus.PENDING.value)
        )
        opened = await session.scalar(
            select(func.count())
            .select_from(Conversation)
            .where(Conversation.opened_at >= start, Conversation.opened_at < end)
        )
        to_assign = (
            await session.execute(
                select(Conversation.opened_at, Conversation.first_assigned_at).where(
                    Conversation.first_assigned_at >= start, Conversation.first_assigned_at < end
                )
            )
        ).all()
        to_reply = (
            await session.execute(
                select(Conversation.opened_at, Conversation.first_reply_at).where(
                    Conversation.first_reply_at >= start, Conversation.first_reply_at < end
                )
            )
        ).all()
        events = [
            (topic[len(prefix) :], type_, created_at, agent_id, previous)
            for topic, type_, created_at, agent_id, previous, _ in rows
        ]
        in_range = [row for row in rows if row[2] < end]
        per_agent = Counter(
            agent_id
            for _, type_, _, agent_id, _, _ in in_range
            if type_ in (ASSIGNED, REASSIGNED) and agent_id
        )
        names = dict(
            (await session.execute(select(Agent.id, Agent.name).where(Agent.id.in_(list(per_agent))))).all()
            if per_agent
            else []
        )
    reasons = Counter(reason or "unknown" for _, type_, _, _, _, reason in in_range if type_ == REASSIGNED)
    counts = list(per_agent.values())
    return {
        "from": start,
        "to": end,
        "conversations_opened": int(opened or 0),
        "assignments": {
            "total": sum(counts),
            "spread": max(counts) - min(counts) if counts else None,
            "per_agent": [
                {"agent_id": agent_id, "name": names.get(agent_id), "assignments": count}
                for agent_id, count in sorted(per_agent.items(), key=lambda item: (-item[1], item[0]))
            ],
        },
        "time_to_assign_s": _percentiles(_durations(list(to_assign))),
        "time_to_first_reply_s": _percentiles(_durations(list(to_reply))),
        "reassignments": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
        "pending": {"now": int(pending_now or 0), **pending_peak(events, pending_before, end)},
    }
