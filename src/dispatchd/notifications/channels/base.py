"""The channel interface every provider adapter implements, and how a failure is described.

A channel turns one outbox row into one provider call. It returns the provider's message id, or raises
:class:`ChannelError` carrying a :class:`Classification` (made by :mod:`dispatchd.notifications.classify`)
that tells the delivery worker what to do next. Secrets never appear in ``detail`` or ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class ErrorKind(StrEnum):
    TEMPORARY = "TEMPORARY"  # retry with the category's backoff
    PERMANENT = "PERMANENT"  # this message cannot be delivered as it is
    ALERT = "ALERT"  # permanent, and an admin must act (account, token, permissions)
    WINDOW_CLOSED = "WINDOW_CLOSED"  # Meta 131047: re-send as the category's approved template
    UNKNOWN = "UNKNOWN"  # not in the table: logged with its raw body, retried a few times only


@dataclass(frozen=True)
class Classification:
    """``code`` is stable and short: ``HTTP_503``, ``META_131047``, ``TIMEOUT``, ``CONNECTION``, …;
    ``opens_circuit`` marks failures of the channel itself (auth), not of one message."""

    kind: ErrorKind
    code: str
    retry_after_s: float | None = None
    opens_circuit: bool = False


@dataclass(frozen=True)
class OutboundMessage:
    id: str
    recipient: str
    category: str
    body: str
    payload: dict[str, Any] | None = None
    #: when set, send this approved template instead of free text: {"name", "language", "parameters"}
    template: dict[str, Any] | None = None


@dataclass(frozen=True)
class SendResult:
    provider_message_id: str | None = None


class ChannelError(Exception):
    """A failed send, with its classification. ``raw`` is the provider's answer (secrets removed)."""

    def __init__(
        self,
        detail: str,
        classification: Classification | None = None,
        *,
        temporary: bool | None = None,
        retry_after_s: float | None = None,
        raw: str | None = None,
    ) -> None:
        super().__init__(detail)
        if classification is None:
            kind = ErrorKind.TEMPORARY if temporary else ErrorKind.PERMANENT
            classification = Classification(kind, "UNSPECIFIED", retry_after_s)
        self.classification = classification
        self.raw = raw

    @property
    def temporary(self) -> bool:
        return self.classification.kind in (ErrorKind.TEMPORARY, ErrorKind.UNKNOWN)

    @property
    def retry_after_s(self) -> float | None:
        return self.classification.retry_after_s


class Channel(Protocol):
    name: str

    async def send(self, message: OutboundMessage) -> SendResult:
        """Deliver one message; raise :class:`ChannelError` on failure."""
        ...
