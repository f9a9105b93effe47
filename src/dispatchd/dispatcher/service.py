"""The dispatcher's units of work: each public method is one transaction (re-run from the start after a
deadlock) around the orchestrator, for the routes, the CLI and the tests. Reads need no orchestrator.

Errors: :class:`~dispatchd.core.errors.NotFound` (``AGENT_NOT_FOUND``, ``CONVERSATION_NOT_FOUND``),
:class:`~dispatchd.core.errors.InvalidState` (a closed conversation), :class:`~dispatchd.core.errors.Conflict`
(``AGENT_UNAVAILABLE``: a transfer to an agent not ONLINE or full; a phone or email already taken).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from dispatchd.core import events, topics
from dispatchd.core.db import Database, retry_transient
from dispatchd.core.errors import Conflict, InvalidInput
from dispatchd.core.ids import new_id
from dispatchd.dispatcher import queue
from dispatchd.dispatcher.models import (
    Agent,
    Conversation,
    ConversationMessage,
    ConversationStatus,
    Presence,
    QueuePosition,
)
from dispatchd.dispatcher.orchestrator import Orchestrator, agent_or_404, conversation_or_404, require_holder


class DispatcherService:
    def __init__(self, db: Database, orchestrator: Orchestrator, *, presence_timeout_s: float = 90.0) -> None:
        self.db = db
        self.orchestrator = orchestrator
        self.presence_timeout_s = presence_timeout_s

    # ----------------------------------------------------------------------------------- agents

    async def create_agent(self, data: dict[str, Any]) -> Agent:
        """``data``: name, phone and/or email, capacity (default 10). The agent starts OFFLINE."""
        if not data.get("phone") and not data.get("email"):
            raise InvalidInput("an agent needs a phone or an email")
        async with self.db.transaction() as session:
            now = session.info["now"]
            agent = Agent(
                id=new_id("agt"),
                presence=Presence.OFFLINE.value,
                open_conversations=0,
                created_at=now,
                updated_at=now,
                **{"capacity": 10, **data},
            )
            session.add(agent)
            try:
                await session.flush()
            except IntegrityError:
                raise Conflict("an agent with this phone or email already exists") from None
            events.append(session, topics.agent(agent.id), "AgentCreated", {"capacity": agent.capacity})
        return agent

    async def get_agent(self, agent_id: str) -> Agent:
        async with self.db.read() as session:
            return await agent_or_404(session, agent_id)

    async def list_agents(self) -> list[Agent]:
        async with self.db.read() as session:
            return list((await session.scalars(select(Agent).order_by(Agent.created_at, Agent.id))).all())

    @retry_transient
    async def set_capacity(self, agent_id: str, capacity: int) -> Agent:
        async with self.db.transaction() as session:
            agent = await agent_or_404(session, agent_id, lock=True)
            agent.capacity = capacity
            agent.updated_at = session.info["now"]
        await self.distribute()  # room it gained goes to the conversations waiting longest
        return agent

    @retry_transient
    async def set_presence(self, agent_id: str, presence: Presence) -> Agent:
        """ONLINE: connected (joins the rotation; pending conversations are distributed); AWAY: keeps its
        conversations, takes no new one; OFFLINE: disconnected (its conversations move on)."""
        async with self.db.transaction() as session:
            if presence is Presence.ONLINE:
                await self.orchestrator.agent_connected(session, agent_id)
            elif presence is Presence.AWAY:
                await self.orchestrator.agent_away(session, agent_id)
            else:
                await self.orchestrator.agent_disconnected(session, agent_id, "agent disconnected")
        if presence is Presence.ONLINE:
            await self.distribute()  # its own transaction (see Orchestrator.agent_connected)
        async with self.db.read() as session:
            return await agent_or_404(session, agent_id)

    @retry_transient
    async def heartbeat(self, agent_id: str) -> Agent:
        async with self.db.transaction() as session:
            return await self.orchestrator.heartbeat(session, agent_id)

    # Presence carried by the realtime connection (issue 9): ONLINE while a stream is open.

    @retry_transient
    async def stream_opened(self, agent_id: str) -> Agent:
        """The agent opened a stream: an OFFLINE agent connects (and pending conversations are
        distributed), an ONLINE or AWAY one is only heartbeated. Raises :class:`NotFound`."""
        async with self.db.transaction() as session:
            agent = await agent_or_404(session, agent_id)
            connecting = agent.presence == Presence.OFFLINE.value
            if connecting:
                await self.orchestrator.agent_connected(session, agent_id)
            else:
                agent.last_heartbeat_at = session.info["now"]
        if connecting:
            await self.distribute()
        async with self.db.read() as session:
            return await agent_or_404(session, agent_id)

    @retry_transient
    async def streams_alive(self, agent_ids: list[str]) -> int:
        """Heartbeat every agent of ``agent_ids`` not OFFLINE (their streams are open); returns how many."""
        if not agent_ids:
            return 0
        async with self.db.transaction() as session:
            result = await session.execute(
                update(Agent)
                .where(Agent.id.in_(agent_ids), Agent.presence != Presence.OFFLINE.value)
                .values(last_heartbeat_at=session.info["now"])
            )
            return result.rowcount

    @retry_transient
    async def stream_lost(self, agent_id: str, grace_s: float) -> None:
        """The agent's last stream closed: unless it reconnects (or heartbeats) within ``grace_s``
        seconds it is disconnected by the ``agent_presence`` deadline and its conversations move on.
        Its heartbeat is back-dated so that this deadline falls ``grace_s`` from now."""
        async with self.db.transaction() as session:
            lapse_at = session.info["now"] - timedelta(seconds=max(0.0, self.presence_timeout_s - grace_s))
            await session.execute(
                update(Agent)
                .where(
                    Agent.id == agent_id,
                    Agent.presence != Presence.OFFLINE.value,
                    Agent.last_heartbeat_at > lapse_at,
                )
                .values(last_heartbeat_at=lapse_at)
            )

    async def queue_view(self) -> list[tuple[Agent, int | None]]:
        """Every agent with its place in the rotation (1 = next; None when not in it), rotation first."""
        async with self.db.read() as session:
            order = await queue.positions(session)
            agents = {agent.id: agent for agent in (await session.scalars(select(Agent))).all()}
        ranked = [(agents[agent_id], rank) for rank, agent_id in enumerate(order, 1) if agent_id in agents]
        others = sorted((a for a in agents.values() if a.id not in order), key=lambda a: (a.created_at, a.id))
        return ranked + [(agent, None) for agent in others]

    # ---------------------------------------------------------------------------- conversations

    @retry_transient
    async def message_in(self, customer_phone: str, body: str | None) -> Conversation:
        """A customer message from another channel than the WhatsApp webhook."""
        async with self.db.transaction() as session:
            return await self.orchestrator.message_arrived(session, customer_phone, body)

    async def list_conversations(
        self,
        *,
        status: ConversationStatus | None = None,
        agent_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Conversation]:
        async with self.db.read() as session:
            query = (
                select(Conversation)
                .order_by(Conversation.last_message_at.desc(), Conversation.id)
                .limit(limit)
                .offset(offset)
            )
            if status is not None:
                query = query.where(Conversation.status == status.value)
            if agent_id is not None:
                query = query.where(Conversation.agent_id == agent_id)
            return list((await session.scalars(query)).all())

    async def get_conversation(self, conversation_id: str) -> Conversation:
        async with self.db.read() as session:
            return await conversation_or_404(session, conversation_id)

    async def thread(
        self, conversation_id: str, *, after: datetime | None = None, limit: int = 500
    ) -> list[ConversationMessage]:
        """The conversation's messages in order (inbound and outbound)."""
        async with self.db.read() as session:
            await conversation_or_404(session, conversation_id)
            query = (
                select(ConversationMessage)
                .where(ConversationMessage.conversation_id == conversation_id)
                .order_by(ConversationMessage.created_at, ConversationMessage.id)
                .limit(limit)
            )
            if after is not None:
                query = query.where(ConversationMessage.created_at > after)
            return list((await session.scalars(query)).all())

    @retry_transient
    async def reply(self, conversation_id: str, agent_id: str | None, body: str) -> ConversationMessage:
        async with self.db.transaction() as session:
            return await self.orchestrator.agent_replied(session, conversation_id, agent_id, body)

    @retry_transient
    async def assign(self, conversation_id: str, agent_id: str, actor: str) -> Conversation:
        async with self.db.transaction() as session:
            return await self.orchestrator.transfer(session, conversation_id, agent_id, actor)

    @retry_transient
    async def close(self, conversation_id: str, reason: str, *, agent_id: str | None = None) -> Conversation:
        """Close it; ``agent_id`` (an agent acting) must hold it (checked under the lock). The room it
        frees goes to the conversations waiting longest."""
        async with self.db.transaction() as session:
            conversation = await conversation_or_404(session, conversation_id, lock=True)
            if conversation.status != ConversationStatus.CLOSED.value:
                require_holder(conversation, agent_id)
            freed = conversation.status == ConversationStatus.ASSIGNED.value
            await self.orchestrator.close(session, conversation, reason)
        if freed:
            await self.distribute()
        return conversation

    @retry_transient
    async def distribute(self, limit: int = 1000) -> int:
        """Force a distribution of the pending conversations; how many were assigned."""
        async with self.db.transaction() as session:
            return await self.orchestrator.distribute_pending(session, limit)

    async def positions(self) -> list[str]:
        async with self.db.read() as session:
            rows = await session.scalars(select(QueuePosition.agent_id).order_by(QueuePosition.position))
            return list(rows.all())
