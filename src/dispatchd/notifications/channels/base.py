"""The channel interface every provider adapter implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class OutboundMessage:
    id: str
    recipient: str
    category: str
    body: str
    payload: dict[str, Any] | None = None


@dataclass(frozen=True)
class SendResult:
    provider_message_id: str | None = None


class ChannelError(Exception):
    """A failed send. ``temporary`` errors are retried with backoff; the others end the message."""

    def __init__(self, message: str, *, temporary: bool, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.temporary = temporary
        self.retry_after_s = retry_after_s


class Channel(Protocol):
    name: str

    async def send(self, message: OutboundMessage) -> SendResult:
        """Deliver one message; raise :class:`ChannelError` on failure."""
        ...
