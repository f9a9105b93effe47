"""The round-robin rotation over connected agents (seed 001 §4.3): add, remove, next, positions, move
to end. It knows nothing of conversations or messages.

The rotation is settled by the database, so that two instances never hand out the same slot and never
put an agent above capacity. Every change of the rotation first takes the rotation lock (a transaction
advisory lock on PostgreSQL; SQLite serialises writers anyway): takers queue one behind the other, and
each reads the positions the previous one committed, so the head is never skipped and two agents never
share a position. The agent is then taken with ``UPDATE agents SET open_conversations =
open_conversations + 1 WHERE … < capacity AND presence = 'ONLINE'`` (``rowcount`` decides) and moved to
the end.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.dispatcher.models import Agent, Presence, QueuePosition

#: how many heads a taker tries before it says nobody has room (a head lost to a concurrent transfer)
_TRIES = 20
#: the key of the rotation's advisory lock (PostgreSQL)
ROTATION_LOCK = 0x6469_7370_0001


async def lock(session: AsyncSession) -> None:
    """Take the rotation lock until the transaction ends (re-entrant; nothing on SQLite). Lock order:
    after the conversation, before any agent row."""
    if session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ROTATION_LOCK})


async def _end(session: AsyncSession) -> int:
    last = await session.scalar(select(func.max(QueuePosition.position)))
    return int(last or 0) + 1


async def add(session: AsyncSession, agent_id: str) -> None:
    """Put the agent at the end of the rotation (no change when already in it)."""
    await lock(session)
    present = await session.scalar(select(QueuePosition.agent_id).where(QueuePosition.agent_id == agent_id))
    if present is None:
        session.add(QueuePosition(agent_id=agent_id, position=await _end(session)))
        await session.flush()


async def remove(session: AsyncSession, agent_id: str) -> None:
    await lock(session)
    await session.execute(delete(QueuePosition).where(QueuePosition.agent_id == agent_id))


async def move_to_end(session: AsyncSession, agent_id: str) -> None:
    await lock(session)
    await session.execute(
        update(QueuePosition).where(QueuePosition.agent_id == agent_id).values(position=await _end(session))
    )


async def positions(session: AsyncSession) -> list[str]:
    """Agent ids in rotation order, next first."""
    rows = await session.scalars(
        select(QueuePosition.agent_id).order_by(QueuePosition.position, QueuePosition.agent_id)
    )
    return list(rows.all())


async def take_next(session: AsyncSession, *, excluding: str | None = None) -> str | None:
    """The next agent of the rotation that is ONLINE with room, with one more conversation counted and
    moved to the end; None when nobody has room. ``excluding`` skips one agent (a reassignment away)."""
    await lock(session)
    for _ in range(_TRIES):
        query = (
            select(QueuePosition.agent_id)
            .join(Agent, Agent.id == QueuePosition.agent_id)
            .where(Agent.presence == Presence.ONLINE.value, Agent.open_conversations < Agent.capacity)
            .order_by(QueuePosition.position, QueuePosition.agent_id)
            .limit(1)
        )
        if excluding is not None:
            query = query.where(QueuePosition.agent_id != excluding)
        agent_id = await session.scalar(query)
        if agent_id is None:
            return None
        if await take(session, agent_id):
            await move_to_end(session, agent_id)
            return agent_id
    return None


async def take(session: AsyncSession, agent_id: str) -> bool:
    """Count one more conversation for this agent if ONLINE with room; False otherwise."""
    result = await session.execute(
        update(Agent)
        .where(
            Agent.id == agent_id,
            Agent.presence == Presence.ONLINE.value,
            Agent.open_conversations < Agent.capacity,
        )
        .values(open_conversations=Agent.open_conversations + 1)
    )
    return result.rowcount == 1


async def release(session: AsyncSession, agent_id: str) -> None:
    """One conversation fewer for this agent."""
    await session.execute(
        update(Agent)
        .where(Agent.id == agent_id, Agent.open_conversations > 0)
        .values(open_conversations=Agent.open_conversations - 1)
    )
