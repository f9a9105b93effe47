"""The seam between inbound WhatsApp messages and the domains that answer them.

The inbox (:mod:`dispatchd.notifications.inbox`) stores every inbound message once and routes it to
the handlers the domains registered, in order: the first handler whose :meth:`InboundHandler.route`
returns an outcome takes the message. It runs inside the inbox's claim transaction, so the domain's
state change and the routing outcome commit together (or not at all, and the claim is retried).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True)
class Inbound:
    """One inbound message as a handler sees it. ``from_phone`` is E.164 (``+2250700000001``);
    ``button_id`` is the id of the reply button or list row tapped; times are UTC."""

    id: str
    from_phone: str
    type: str
    text: str | None
    button_id: str | None
    context_message_id: str | None
    sent_at: datetime | None
    received_at: datetime


class InboundHandler(Protocol):
    """A domain's handler of inbound messages. ``name`` (``matching.offer_button``) is stored on the
    message it takes."""

    name: str

    async def route(self, session: AsyncSession, message: Inbound) -> str | None:
        """Handle ``message`` in ``session`` and return its outcome (a short code such as ``ASSIGNED``),
        or None when this handler does not take it. Raising rolls back this handler's work and counts
        as a failed attempt, retried with backoff."""
        ...
