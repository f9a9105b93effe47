"""The dispatcher's handler of inbound WhatsApp messages: offered after matching's handlers, it takes
every message they do not (a customer writing to the business), as seed 001 §6.1 "message entrant"."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.inbound import Inbound
from dispatchd.dispatcher.models import ConversationStatus
from dispatchd.dispatcher.orchestrator import Orchestrator


class CustomerMessage:
    """``dispatcher.customer_message``: outcome ``ASSIGNED`` (its conversation has an agent) or
    ``PENDING`` (held until one can take it)."""

    name = "dispatcher.customer_message"

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    async def route(self, session: AsyncSession, message: Inbound) -> str | None:
        if not message.from_phone:
            return None
        body = message.text if message.text is not None else f"[{message.type}]"
        conversation = await self.orchestrator.message_arrived(
            session, message.from_phone, body, inbound_message_id=message.id
        )
        return conversation.status if conversation.status != ConversationStatus.CLOSED.value else None
