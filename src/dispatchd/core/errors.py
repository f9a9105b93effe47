"""The one exception tree of dispatchd, answered as RFC 9457 ``application/problem+json``.

Every exception class of the project, with its HTTP status, its ``code`` and the module that defines
it (``dispatchd.`` omitted), and the other codes a class is raised with, and where::

    DispatchdError (500 INTERNAL_ERROR; core.errors)
    ├── Unauthorized (401 UNAUTHORIZED; core.errors), also STREAM_TOKEN_INVALID, STREAM_TOKEN_EXPIRED
    │   (realtime.tokens) and KEY_REVOKED (realtime.service: a stream token whose key was revoked)
    ├── Forbidden (403 FORBIDDEN; core.errors)
    ├── NotFound (404 NOT_FOUND; core.errors), raised with the code of what is missing, by id through
    │   core.rows.get_or_404 unless said otherwise:
    │     BOOKING_NOT_FOUND             matching.lookups (bookings)
    │     DRIVER_NOT_FOUND              matching.lookups (drivers; also cli.keys, `keys create --driver-id`)
    │     OFFER_NOT_FOUND               matching.answers (a driver answering a booking never offered to
    │                                   it; raised directly)
    │     RESOURCE_NOT_FOUND            reservations.common (resources)
    │     RESERVATION_NOT_FOUND         reservations.common (reservations)
    │     WAITING_LIST_ENTRY_NOT_FOUND  reservations.common (waiting-list entries)
    │     NOTIFICATION_NOT_FOUND        notifications.admin (outbox rows)
    │     API_KEY_NOT_FOUND             core.auth (API keys)
    │     INBOUND_MESSAGE_NOT_FOUND     notifications.inbox, notifications.inbox_router (messages
    │                                   received by webhook)
    │     AGENT_NOT_FOUND               dispatcher.orchestrator (agents)
    │     CONVERSATION_NOT_FOUND        dispatcher.orchestrator (conversations)
    ├── InvalidInput (422 VALIDATION_ERROR; core.errors), also IDEMPOTENCY_KEY_REUSED (core.idempotency,
    │   notifications.router)
    ├── RateLimited (429 RATE_LIMITED, with Retry-After; reservations.router)
    ├── TooManyStreams (429 TOO_MANY_STREAMS, with Retry-After; realtime.service)
    ├── MalformedJson (400 MALFORMED_JSON; notifications.webhook_parsing)
    ├── InvalidWebhookPayload (400 VALIDATION_ERROR; notifications.webhook_parsing)
    ├── WebhookNotConfigured (503 WEBHOOK_NOT_CONFIGURED; notifications.webhook_parsing)
    └── Conflict (409 CONFLICT; core.errors)
        ├── InvalidState (409 INVALID_STATE; core.errors)
        ├── (Conflict with code AGENT_UNAVAILABLE: a transfer to an agent not ONLINE or full;
        │    dispatcher.orchestrator)
        ├── ResourceFull (409 RESOURCE_FULL; reservations.common)
        └── ResourceClosed (409 RESOURCE_CLOSED; reservations.common)

Outside the tree, the HTTP layer (core.http) answers 413 PAYLOAD_TOO_LARGE before anything reads a body
over ``DISPATCHD_MAX_BODY_BYTES``, 400 MALFORMED_JSON and 422 VALIDATION_ERROR (with an ``errors`` list)
for bodies FastAPI refuses, 400 MALFORMED_REQUEST for a NUL in the URL, 404 NOT_FOUND
/ 405 METHOD_NOT_ALLOWED for unknown routes, and 500 INTERNAL_ERROR, never a stack trace, for anything
else. Every subclass carries a stable ``code``; clients branch on it, never on ``detail``.
"""

from __future__ import annotations

from typing import Any


class DispatchdError(Exception):
    status = 500
    code = "INTERNAL_ERROR"
    title = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code:
            self.code = code
        self.extra = extra or {}
        self.headers = dict(headers or {})


class Unauthorized(DispatchdError):
    status = 401
    code = "UNAUTHORIZED"
    title = "Unauthorized"


class Forbidden(DispatchdError):
    status = 403
    code = "FORBIDDEN"
    title = "Forbidden"


class NotFound(DispatchdError):
    status = 404
    code = "NOT_FOUND"
    title = "Not found"


class InvalidInput(DispatchdError):
    status = 422
    code = "VALIDATION_ERROR"
    title = "Invalid input"


class Conflict(DispatchdError):
    status = 409
    code = "CONFLICT"
    title = "Conflict"


class InvalidState(Conflict):
    code = "INVALID_STATE"
    title = "Invalid state"


def problem(
    *, status: int, code: str, title: str, detail: str, instance: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Build an RFC 9457 problem object (RFC 9457 §3.1 members plus the ``code`` extension)."""
    body: dict[str, Any] = {
        "type": f"https://dispatchd.dev/problems/{code.lower().replace('_', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body
