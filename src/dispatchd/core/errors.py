"""The one exception tree of dispatchd, answered as RFC 9457 ``application/problem+json``.

::

    DispatchdError (500 INTERNAL_ERROR)
    ├── Unauthorized (401 UNAUTHORIZED)
    ├── Forbidden (403 FORBIDDEN)
    ├── NotFound (404 NOT_FOUND; codes BOOKING_NOT_FOUND, DRIVER_NOT_FOUND, OFFER_NOT_FOUND, …)
    ├── InvalidInput (422 VALIDATION_ERROR; IDEMPOTENCY_KEY_REUSED)
    ├── RateLimited (429 RATE_LIMITED, with Retry-After; reservations.router)
    └── Conflict (409 CONFLICT)
        ├── InvalidState (409 INVALID_STATE)
        ├── ResourceFull (409 RESOURCE_FULL; reservations.service)
        └── ResourceClosed (409 RESOURCE_CLOSED; reservations.service)

Every subclass carries a stable ``code``; clients branch on it, never on ``detail``.
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
