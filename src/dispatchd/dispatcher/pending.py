"""Messages held while no agent can take their conversation (seed 001 §4.6): add, list (oldest first),
remove. It never distributes."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.ids import new_id
from dispatchd.dispatcher.models import PendingMessage


async def add(session: AsyncSession, conversation_id: str, conversation_message_id: str) -> PendingMessage:
    row = PendingMessage(
        id=new_id("pnd"),
        conversation_id=conversation_id,
        conversation_message_id=conversation_message_id,
        created_at=session.info["now"],
    )
    session.add(row)
    return row


async def conversations_oldest_first(session: AsyncSession, limit: int) -> list[str]:
    """Ids of the conversations with held messages, the one waiting longest first."""
    rows = await session.execute(
        select(PendingMessage.conversation_id, func.min(PendingMessage.created_at).label("since"))
        .group_by(PendingMessage.conversation_id)
        .order_by("since", PendingMessage.conversation_id)
        .limit(limit)
    )
    return [conversation_id for conversation_id, _ in rows.all()]


async def remove_for(session: AsyncSession, conversation_id: str) -> int:
    """Drop the held messages of a conversation an agent now has (or that closed); how many."""
    result = await session.execute(
        delete(PendingMessage).where(PendingMessage.conversation_id == conversation_id)
    )
    return result.rowcount or 0


async def count(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(PendingMessage)) or 0)
