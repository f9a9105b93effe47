"""The dispatcher's orchestrator (seed 001 §4.2, §6): takes the three events (a customer message
arrived, an agent connected, an agent disconnected) and the few that follow from them (a distribution,
an agent's reply, a close, a transfer), asks :func:`~dispatchd.dispatcher.assignment.decide`, and
applies the decision: rows, events and outbox messages in the caller's transaction. It holds no rule.

Lock order: conversation → rotation (one lock, :func:`dispatchd.dispatcher.queue.lock`) → agent. A
connect, a disconnect and a step away take the rotation lock before their agent's row. A disconnect
marks the agent OFFLINE first (so no new conversation can reach it), then takes its conversations with
SKIP LOCKED; one held by a concurrent transaction is handed on by the ``orphaned_conversations``
deadline at the next tick.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, topics
from dispatchd.core.db import lock_for_update, savepoint
from dispatchd.core.errors import Conflict, Forbidden, InvalidState
from dispatchd.core.ids import new_id
from dispatchd.core.rows import get_or_404
from dispatchd.dispatcher import metrics, pending, queue
from dispatchd.dispatcher.assignment import (
    AssignmentDecision,
    AssignNewAgent,
    KeepCurrentAgent,
    Pending,
    decide,
)
from dispatchd.dispatcher.models import (
    Agent,
    Conversation,
    ConversationMessage,
    ConversationStatus,
    Direction,
    Presence,
)
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Message

#: Outbox categories the dispatcher writes.
AGENT_REPLY = "conversation_reply"
PENDING_NOTICE = "conversation_pending_notice"

#: Presences that keep their own conversations (AWAY takes no new one).
PRESENT = (Presence.ONLINE.value, Presence.AWAY.value)


@dataclass(frozen=True)
class DispatcherConfig:
    """``pending_notice``: the text a customer gets once per conversation when nobody can answer."""

    pending_notice: str = "Merci pour votre message : un conseiller vous répond dès que possible."


def _now(session: AsyncSession) -> datetime:
    return session.info["now"]


def message_id() -> str:
    """``cmg_`` + the creation time in ns + random: messages written in one instant (one transaction
    timestamp, a coarse clock) keep their order in the thread."""
    return f"cmg_{time.time_ns():016x}{secrets.token_hex(8)}"


def _label(reason: str | None) -> str:
    """A bounded Prometheus label: "transfer by admin:key_…" counts as "transfer"."""
    if reason is None:
        return "unknown"
    return "transfer" if reason.startswith("transfer by") else reason


def require_holder(conversation: Conversation, agent_id: str | None) -> None:
    """Raise :class:`Forbidden` when ``agent_id`` (an agent acting, not staff) does not hold it now."""
    if agent_id is not None and (
        conversation.agent_id != agent_id or conversation.status != ConversationStatus.ASSIGNED.value
    ):
        raise Forbidden("an agent key may act only on the conversations assigned to its agent")


async def conversation_or_404(
    session: AsyncSession, conversation_id: str, *, lock: bool = False
) -> Conversation:
    return await get_or_404(
        session, Conversation, conversation_id, code="CONVERSATION_NOT_FOUND", what="conversation", lock=lock
    )


async def agent_or_404(session: AsyncSession, agent_id: str, *, lock: bool = False) -> Agent:
    return await get_or_404(session, Agent, agent_id, code="AGENT_NOT_FOUND", what="agent", lock=lock)


class Orchestrator:
    def __init__(self, config: DispatcherConfig | None = None) -> None:
        self.config = config or DispatcherConfig()

    # ------------------------------------------------------------------------------ message arrived

    async def message_arrived(
        self,
        session: AsyncSession,
        customer_phone: str,
        body: str | None,
        *,
        inbound_message_id: str | None = None,
    ) -> Conversation:
        """Seed 001 §6.1: the customer's open conversation (or a new one) gets the message, then the
        decision: keep its online agent, give it to the next agent, or hold it."""
        now = _now(session)
        conversation, opened = await self._open_conversation(session, customer_phone)
        message = ConversationMessage(
            id=message_id(),
            conversation_id=conversation.id,
            direction=Direction.IN.value,
            body=body,
            inbound_message_id=inbound_message_id,
            created_at=now,
        )
        session.add(message)
        conversation.last_message_at = conversation.last_customer_message_at = now
        if conversation.awaiting_reply_since is None:
            conversation.awaiting_reply_since = now
        topic = topics.conversation(conversation.id)
        if opened:
            events.append(session, topic, "ConversationOpened", {"customer_phone": customer_phone})
        events.append(session, topic, "MessageReceived", {"message_id": message.id, "body": body})
        await session.flush()
        current = await self._present_agent(session, conversation)
        reason = None
        if current is not None:
            decision = decide(not opened, current, None)
        else:
            if conversation.status == ConversationStatus.ASSIGNED.value and conversation.agent_id:
                await queue.lock(session)  # lock order: the rotation before any agent row
                await queue.release(session, conversation.agent_id)  # its agent is gone
                reason = "agent disconnected"
            decision = decide(not opened, None, await queue.take_next(session))
        await self._apply(session, conversation, decision, message_ids=[message.id], reason=reason)
        if conversation.status == ConversationStatus.ASSIGNED.value and conversation.agent_id:
            # An agent's key reads its own topic only: its conversations' messages are copied there.
            events.append(
                session,
                topics.agent(conversation.agent_id),
                "MessageReceived",
                {"conversation_id": conversation.id, "message_id": message.id, "body": body},
            )
        return conversation

    async def _open_conversation(
        self, session: AsyncSession, customer_phone: str
    ) -> tuple[Conversation, bool]:
        query = lock_for_update(
            select(Conversation)
            .where(
                Conversation.customer_phone == customer_phone,
                Conversation.status != ConversationStatus.CLOSED.value,
            )
            .execution_options(populate_existing=True)
        )
        found = await session.scalar(query)
        if found is not None:
            return found, False
        now = _now(session)
        conversation = Conversation(
            id=new_id("cnv"),
            customer_phone=customer_phone,
            status=ConversationStatus.PENDING.value,
            opened_at=now,
            last_message_at=now,
            last_customer_message_at=now,
            pending_notice_sent=False,
            reassignments=0,
        )
        try:
            async with savepoint(session):
                session.add(conversation)
                await session.flush()
        except IntegrityError:  # a concurrent message of the same customer opened it first
            found = await session.scalar(query)
            if found is None:
                raise
            return found, False
        metrics.CONVERSATIONS_OPENED.inc()
        return conversation, True

    async def _present_agent(self, session: AsyncSession, conversation: Conversation) -> str | None:
        if conversation.status != ConversationStatus.ASSIGNED.value or conversation.agent_id is None:
            return None
        presence = await session.scalar(select(Agent.presence).where(Agent.id == conversation.agent_id))
        return conversation.agent_id if presence in PRESENT else None

    async def _apply(
        self,
        session: AsyncSession,
        conversation: Conversation,
        decision: AssignmentDecision,
        *,
        message_ids: Sequence[str] = (),
        reason: str | None = None,
    ) -> None:
        """Apply ``decision``; a Pending one holds ``message_ids`` (at least one per conversation)."""
        topic = topics.conversation(conversation.id)
        now = _now(session)
        if isinstance(decision, KeepCurrentAgent):
            return
        if isinstance(decision, AssignNewAgent):
            previous = (
                conversation.agent_id if conversation.status == ConversationStatus.ASSIGNED.value else None
            )
            waited_since = conversation.pending_since or conversation.opened_at
            conversation.status = ConversationStatus.ASSIGNED.value
            conversation.agent_id = decision.agent_id
            conversation.assigned_at = now
            conversation.first_assigned_at = conversation.first_assigned_at or now
            conversation.pending_since = None
            if conversation.awaiting_reply_since is not None:
                conversation.awaiting_reply_since = now  # the new agent's reply timeout starts now
            await pending.remove_for(session, conversation.id)
            data = {"agent_id": decision.agent_id, "decision": "ASSIGN_NEW_AGENT"}
            if previous is not None or reason is not None:
                conversation.reassignments += 1
                data |= {"previous_agent_id": previous, "reason": reason}
                events.append(session, topic, "ConversationReassigned", data)
                if previous is not None and previous != decision.agent_id:
                    events.append(
                        session,
                        topics.agent(previous),
                        "ConversationUnassigned",
                        {"conversation_id": conversation.id, "reason": reason},
                    )
                metrics.CONVERSATIONS_REASSIGNED.labels(_label(reason)).inc()
            else:
                events.append(session, topic, "ConversationAssigned", data)
                metrics.TIME_TO_ASSIGN.observe(max(0.0, (now - waited_since).total_seconds()))
            events.append(
                session,
                topics.agent(decision.agent_id),
                "ConversationAssigned",
                {"conversation_id": conversation.id, **data},
            )
            return
        assert isinstance(decision, Pending)
        for held in message_ids:
            await pending.add(session, conversation.id, held)
        if conversation.status != ConversationStatus.PENDING.value or conversation.pending_since is None:
            previous = (
                conversation.agent_id if conversation.status == ConversationStatus.ASSIGNED.value else None
            )
            conversation.status = ConversationStatus.PENDING.value
            conversation.agent_id = None
            conversation.pending_since = now
            if previous is not None:
                conversation.reassignments += 1
                events.append(
                    session,
                    topic,
                    "ConversationReassigned",
                    {"previous_agent_id": previous, "agent_id": None, "reason": reason},
                )
                events.append(
                    session,
                    topics.agent(previous),
                    "ConversationUnassigned",
                    {"conversation_id": conversation.id, "reason": reason},
                )
                metrics.CONVERSATIONS_REASSIGNED.labels(_label(reason)).inc()
            events.append(session, topic, "ConversationPending", {"reason": reason})
        if not conversation.pending_notice_sent:
            conversation.pending_notice_sent = True
            await outbox.enqueue(
                session,
                [
                    Message(
                        recipient=conversation.customer_phone,
                        category=PENDING_NOTICE,
                        body=self.config.pending_notice,
                        subject=topic,
                    )
                ],
            )

    async def hand_on_one(self, session: AsyncSession, conversation: Conversation, reason: str) -> None:
        """Hand a conversation on from its agent (already released): the next agent, or pending with its
        unanswered customer messages held (the last customer message when all were answered)."""
        decision = decide(True, None, await queue.take_next(session, excluding=conversation.agent_id))
        held: list[str] = []
        if isinstance(decision, Pending):
            inbound = (
                select(ConversationMessage.id)
                .where(
                    ConversationMessage.conversation_id == conversation.id,
                    ConversationMessage.direction == Direction.IN.value,
                )
                .order_by(ConversationMessage.created_at.desc(), ConversationMessage.id.desc())
            )
            if conversation.awaiting_reply_since is not None:
                held = list(
                    (
                        await session.scalars(
                            inbound.where(ConversationMessage.created_at >= conversation.awaiting_reply_since)
                        )
                    ).all()
                )
            held = held or list((await session.scalars(inbound.limit(1))).all())
        await self._apply(session, conversation, decision, message_ids=held, reason=reason)

    # ---------------------------------------------------------------------------- agent connected

    async def agent_connected(self, session: AsyncSession, agent_id: str) -> None:
        """Seed 001 §6.2: the agent is ONLINE and joins the rotation. The caller distributes the pending
        conversations next, in a transaction of its own: a connect holds its agent's row, and a
        distribution takes other agents' rows, so doing both in one transaction would let two connects
        deadlock."""
        now = _now(session)
        await queue.lock(session)  # lock order: the rotation before any agent row
        result = await session.execute(
            update(Agent)
            .where(Agent.id == agent_id, Agent.presence != Presence.ONLINE.value)
            .values(presence=Presence.ONLINE.value, connected_at=now, last_heartbeat_at=now, updated_at=now)
        )
        if result.rowcount == 1:
            events.append(session, topics.agent(agent_id), "AgentConnected", {})
        else:
            agent = await agent_or_404(session, agent_id)
            agent.last_heartbeat_at = now
        await queue.add(session, agent_id)

    async def heartbeat(self, session: AsyncSession, agent_id: str) -> Agent:
        agent = await agent_or_404(session, agent_id, lock=True)
        if agent.presence == Presence.OFFLINE.value:
            raise InvalidState(f"agent {agent_id} is OFFLINE; connect first")
        agent.last_heartbeat_at = _now(session)
        return agent

    async def agent_away(self, session: AsyncSession, agent_id: str) -> Agent:
        """AWAY: keeps its conversations, takes no new one (it leaves the rotation)."""
        await queue.lock(session)  # lock order: the rotation before any agent row
        agent = await agent_or_404(session, agent_id, lock=True)
        now = _now(session)
        agent.presence = Presence.AWAY.value
        agent.last_heartbeat_at = agent.updated_at = now
        await queue.remove(session, agent_id)
        events.append(session, topics.agent(agent_id), "AgentAway", {})
        return agent

    # ------------------------------------------------------------------------- agent disconnected

    async def agent_disconnected(
        self, session: AsyncSession, agent_id: str, reason: str = "agent disconnected"
    ) -> int:
        """Seed 001 §6.3: the agent leaves the rotation; each of its conversations goes to the next
        agent or becomes pending (never both, never neither). Returns how many were handed on."""
        now = _now(session)
        await queue.lock(session)  # lock order: the rotation before any agent row
        result = await session.execute(
            update(Agent)
            .where(Agent.id == agent_id, Agent.presence != Presence.OFFLINE.value)
            .values(presence=Presence.OFFLINE.value, updated_at=now)
        )
        if result.rowcount == 1:
            events.append(session, topics.agent(agent_id), "AgentDisconnected", {"reason": reason})
        else:
            await agent_or_404(session, agent_id)
        await queue.remove(session, agent_id)
        return await self.hand_on(session, agent_id, reason)

    async def hand_on(
        self, session: AsyncSession, agent_id: str, reason: str, limit: int | None = None
    ) -> int:
        """Every conversation this (no longer present) agent holds goes to the next agent or pending."""
        query = (
            select(Conversation)
            .where(
                Conversation.agent_id == agent_id, Conversation.status == ConversationStatus.ASSIGNED.value
            )
            .order_by(Conversation.id)
            .with_for_update(skip_locked=True, key_share=True)
            .execution_options(populate_existing=True)
        )
        if limit is not None:
            query = query.limit(limit)
        conversations = list((await session.scalars(query)).all())
        for conversation in conversations:
            await queue.release(session, agent_id)
            await self.hand_on_one(session, conversation, reason)
        return len(conversations)

    # ----------------------------------------------------------------------------- distribution

    async def distribute_pending(self, session: AsyncSession, limit: int = 1000) -> int:
        """Give the pending conversations, oldest first, to the next agents with room; stop when nobody
        has room. Returns how many were assigned."""
        assigned = 0
        for conversation_id in await pending.conversations_oldest_first(session, limit):
            conversation = await session.scalar(
                select(Conversation)
                .where(
                    Conversation.id == conversation_id,
                    Conversation.status == ConversationStatus.PENDING.value,
                )
                .with_for_update(skip_locked=True, key_share=True)
                .execution_options(populate_existing=True)
            )
            if conversation is None:
                continue
            agent_id = await queue.take_next(session)
            if agent_id is None:
                break
            await self._apply(session, conversation, decide(True, None, agent_id))
            assigned += 1
        return assigned

    # ------------------------------------------------------------------------ replies, close, transfer

    async def agent_replied(
        self, session: AsyncSession, conversation_id: str, agent_id: str | None, body: str
    ) -> ConversationMessage:
        """An agent's (``agent_id``: only while the conversation is assigned to it) or staff's (None)
        reply: a thread message and an outbox message to the customer. Raises :class:`InvalidState` on a
        closed conversation, :class:`Forbidden` when the agent no longer holds it (checked under the
        conversation's lock)."""
        conversation = await conversation_or_404(session, conversation_id, lock=True)
        if conversation.status == ConversationStatus.CLOSED.value:
            raise InvalidState(f"conversation {conversation_id} is CLOSED")
        require_holder(conversation, agent_id)
        now = _now(session)
        [notification_id] = await outbox.enqueue(
            session,
            [
                Message(
                    recipient=conversation.customer_phone,
                    category=AGENT_REPLY,
                    body=body,
                    subject=topics.conversation(conversation_id),
                )
            ],
        )
        message = ConversationMessage(
            id=message_id(),
            conversation_id=conversation_id,
            direction=Direction.OUT.value,
            body=body,
            notification_id=notification_id,
            agent_id=agent_id,
            created_at=now,
        )
        session.add(message)
        conversation.last_message_at = now
        conversation.awaiting_reply_since = None
        if conversation.first_reply_at is None:
            conversation.first_reply_at = now
        events.append(
            session,
            topics.conversation(conversation_id),
            "MessageSent",
            {"message_id": message.id, "agent_id": agent_id, "body": body},
        )
        return message

    async def close(self, session: AsyncSession, conversation: Conversation, reason: str) -> None:
        """CLOSED: its agent has one conversation fewer, its held messages are dropped."""
        if conversation.status == ConversationStatus.CLOSED.value:
            return
        if conversation.status == ConversationStatus.ASSIGNED.value and conversation.agent_id:
            await queue.release(session, conversation.agent_id)
        await pending.remove_for(session, conversation.id)
        conversation.status = ConversationStatus.CLOSED.value
        conversation.closed_at = _now(session)
        conversation.close_reason = reason
        conversation.pending_since = None
        events.append(
            session,
            topics.conversation(conversation.id),
            "ConversationClosed",
            {"reason": reason, "agent_id": conversation.agent_id},
        )
        if conversation.agent_id:
            events.append(
                session,
                topics.agent(conversation.agent_id),
                "ConversationClosed",
                {"conversation_id": conversation.id, "reason": reason},
            )
        metrics.CONVERSATIONS_CLOSED.labels(reason).inc()

    async def transfer(
        self, session: AsyncSession, conversation_id: str, agent_id: str, actor: str
    ) -> Conversation:
        """A manual transfer to ``agent_id`` (ONLINE, with room). Raises :class:`InvalidState` (closed),
        :class:`Conflict` (the agent is not ONLINE or is full)."""
        conversation = await conversation_or_404(session, conversation_id, lock=True)
        if conversation.status == ConversationStatus.CLOSED.value:
            raise InvalidState(f"conversation {conversation_id} is CLOSED")
        if conversation.agent_id == agent_id and conversation.status == ConversationStatus.ASSIGNED.value:
            return conversation
        await agent_or_404(session, agent_id)
        previous = conversation.agent_id if conversation.status == ConversationStatus.ASSIGNED.value else None
        for touched in sorted({agent_id, previous} - {None}):  # agents' rows in id order: no deadlock
            if touched == agent_id:
                if not await queue.take(session, agent_id):
                    raise Conflict(f"agent {agent_id} is not ONLINE or has no room", code="AGENT_UNAVAILABLE")
            else:
                await queue.release(session, touched)
        await self._apply(session, conversation, AssignNewAgent(agent_id), reason=f"transfer by {actor}")
        return conversation

    async def reassign(self, session: AsyncSession, conversation: Conversation, reason: str) -> None:
        """Hand an ASSIGNED conversation on from its agent (a reply timeout): to the next agent, or kept
        when nobody else has room (the customer is better served late than by nobody)."""
        current = conversation.agent_id
        other = await queue.take_next(session, excluding=current)
        if other is None:
            conversation.awaiting_reply_since = _now(session)  # counted; looked at again one timeout later
            metrics.CONVERSATIONS_REASSIGNED.labels(f"{reason} (kept)").inc()
            return
        if current:
            await queue.release(session, current)
        await self._apply(session, conversation, AssignNewAgent(other), reason=reason)
