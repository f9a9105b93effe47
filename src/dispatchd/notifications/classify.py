"""Provider failures → :class:`~dispatchd.notifications.channels.base.Classification`: one table.

The table is the issue's ("classify provider failures"), kept as data below and tested code by code in
``tests/unit/test_classify.py``. Meta codes are those of the WhatsApp Cloud API "Error codes" page
(https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes); a Graph API error answer
looks like ``{"error": {"message": "(#131047) Re-engagement message", "type": "OAuthException",
"code": 131047, "error_data": {"details": "..."}, "fbtrace_id": "..."}}``.

==============================================  =================  =========================================
failure                                         kind               note
==============================================  =================  =========================================
timeout, connection error                       TEMPORARY          codes ``TIMEOUT``, ``CONNECTION``
HTTP 429, 502, 503                              TEMPORARY          ``Retry-After`` honoured when sent
Meta 1, 2, 4, 80007, 130429, 131000, 131016,    TEMPORARY          rate limits, service unavailable,
131056, 131057                                                     maintenance
HTTP 400; Meta 100, 131008, 131009, 131026,     PERMANENT          this message only
131050, 132000-132016
HTTP 401, 403; Meta 0, 3, 10, 190, 200-299,     ALERT              an admin must act; 401, 403, Meta 0, 190,
368, 131031, 131042                                                131031, 131042 also open the circuit
Meta 131047                                     WINDOW_CLOSED      24 h customer-service window closed
anything else (HTTP 500, 418, other Meta code)  UNKNOWN            logged with its raw body, few retries
==============================================  =================  =========================================

When the body carries a Meta ``error.code`` that code decides, whatever the HTTP status; only bodies
without one fall back to the HTTP status. WaChap (an unofficial gateway) answers HTTP 200 with
``{"status": "error", "message": "..."}`` for failures: :func:`classify_wachap` reads that message.
SMTP failures (aiosmtplib exceptions) go through :func:`classify_smtp`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from dispatchd.notifications.channels.base import Classification, ErrorKind

TEMPORARY = ErrorKind.TEMPORARY
PERMANENT = ErrorKind.PERMANENT
ALERT = ErrorKind.ALERT
WINDOW_CLOSED = ErrorKind.WINDOW_CLOSED
UNKNOWN = ErrorKind.UNKNOWN

#: HTTP status → kind, used when the body has no Meta ``error.code`` (and for WaChap's non-200 answers).
HTTP_STATUS_KINDS: dict[int, ErrorKind] = {
    429: TEMPORARY,
    502: TEMPORARY,
    503: TEMPORARY,
    400: PERMANENT,
    401: ALERT,
    403: ALERT,
}
HTTP_STATUS_OPENS_CIRCUIT: frozenset[int] = frozenset({401, 403})

#: Meta Graph / Cloud API ``error.code`` → kind (single codes).
META_CODE_KINDS: dict[int, ErrorKind] = {
    1: TEMPORARY,  # API unknown
    2: TEMPORARY,  # API service
    4: TEMPORARY,  # API too many calls (app rate limit)
    80007: TEMPORARY,  # WABA rate limit
    130429: TEMPORARY,  # Cloud API throughput reached
    131000: TEMPORARY,  # something went wrong
    131016: TEMPORARY,  # service unavailable
    131056: TEMPORARY,  # pair rate limit (too many messages to this recipient)
    131057: TEMPORARY,  # account in maintenance mode
    100: PERMANENT,  # invalid parameter
    131008: PERMANENT,  # required parameter missing
    131009: PERMANENT,  # parameter value not valid
    131026: PERMANENT,  # message undeliverable (not a WhatsApp user, old app, …)
    131050: PERMANENT,  # user stopped marketing messages
    0: ALERT,  # AuthException
    3: ALERT,  # API method (capability or permission)
    10: ALERT,  # permission denied
    190: ALERT,  # access token expired or invalid
    368: ALERT,  # temporarily blocked for policy violations
    131031: ALERT,  # business account locked
    131042: ALERT,  # business eligibility: payment issue
    131047: WINDOW_CLOSED,  # re-engagement message: more than 24 h since the user's last message
}
#: Meta ``error.code`` ranges → kind (``range`` ends are exclusive).
META_CODE_RANGES: tuple[tuple[range, ErrorKind], ...] = (
    (range(132000, 132017), PERMANENT),  # template errors (missing, paused, parameters, …)
    (range(200, 300), ALERT),  # API permission errors
)
META_CODE_OPENS_CIRCUIT: frozenset[int] = frozenset({0, 190, 131031, 131042})

#: WaChap ``message`` patterns (case-insensitive), tried in this order; no match → UNKNOWN.
WACHAP_MESSAGE_KINDS: tuple[tuple[re.Pattern[str], ErrorKind, bool], ...] = (
    (re.compile(r"token|auth|unauthori[sz]ed|expired|subscription", re.I), ALERT, True),
    (
        re.compile(r"invalid (phone )?number|not registered|not exists?\b|does not exist", re.I),
        PERMANENT,
        False,
    ),
)


def meta_kind(code: int) -> ErrorKind:
    """The kind of one Meta ``error.code`` (UNKNOWN when not in the table)."""
    kind = META_CODE_KINDS.get(code)
    if kind is not None:
        return kind
    for codes, ranged_kind in META_CODE_RANGES:
        if code in codes:
            return ranged_kind
    return UNKNOWN


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).

    A date in the past gives 0.0; anything unreadable (or negative) gives None.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds else None  # NaN != NaN
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def classify_http(status: int, body: object, headers: Mapping[str, str] | None = None) -> Classification:
    """Classify a Meta Graph API answer. ``body`` is the decoded JSON (or its text/bytes); a Meta
    ``error.code`` in it decides, else ``status``. ``retry_after_s`` comes from ``Retry-After``."""
    retry_after_s = parse_retry_after(_header(headers, "retry-after"))
    code = meta_error_code(body)
    if code is not None:
        return Classification(
            meta_kind(code), f"META_{code}", retry_after_s, opens_circuit=code in META_CODE_OPENS_CIRCUIT
        )
    return _classify_status(status, retry_after_s)


def classify_transport(exc: BaseException) -> Classification:
    """Classify an exception raised before any answer: timeouts → ``TIMEOUT``, other transport or socket
    errors → ``CONNECTION`` (both TEMPORARY); anything else is UNKNOWN ``EXCEPTION``."""
    import httpx

    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return Classification(TEMPORARY, "TIMEOUT")
    if isinstance(exc, httpx.TransportError | OSError):
        return Classification(TEMPORARY, "CONNECTION")
    return Classification(UNKNOWN, "EXCEPTION")


def classify_wachap(status: int, body: object, headers: Mapping[str, str] | None = None) -> Classification:
    """Classify a failed WaChap answer. Not 2xx → by HTTP status (``HTTP_<status>``); a 2xx (WaChap says
    HTTP 200 + ``{"status": "error", "message": ...}``) → by its message, code ``WACHAP_ERROR``."""
    retry_after_s = parse_retry_after(_header(headers, "retry-after"))
    if not 200 <= status < 300:
        return _classify_status(status, retry_after_s)
    message = wachap_error_message(body)
    for pattern, kind, opens_circuit in WACHAP_MESSAGE_KINDS:
        if pattern.search(message):
            return Classification(kind, "WACHAP_ERROR", retry_after_s, opens_circuit=opens_circuit)
    return Classification(UNKNOWN, "WACHAP_ERROR", retry_after_s)


def classify_smtp(exc: BaseException) -> Classification:
    """Classify an aiosmtplib failure: authentication → ALERT ``SMTP_AUTH`` (opens the circuit); every
    recipient refused → PERMANENT ``SMTP_RECIPIENT``; connection, disconnection, timeout or socket error →
    TEMPORARY ``SMTP_CONNECTION``; another reply 4xx → TEMPORARY, 5xx → PERMANENT ``SMTP_<code>``; server
    lacking a needed extension (AUTH, STARTTLS) → ALERT ``SMTP_NOT_SUPPORTED``; else UNKNOWN."""
    import aiosmtplib

    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return Classification(ALERT, "SMTP_AUTH", opens_circuit=True)
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return Classification(PERMANENT, "SMTP_RECIPIENT")
    if isinstance(
        exc,
        aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected | TimeoutError | OSError,
    ):
        return Classification(TEMPORARY, "SMTP_CONNECTION")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if 400 <= exc.code < 500:
            return Classification(TEMPORARY, f"SMTP_{exc.code}")
        if 500 <= exc.code < 600:
            return Classification(PERMANENT, f"SMTP_{exc.code}")
        return Classification(UNKNOWN, f"SMTP_{exc.code}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return Classification(ALERT, "SMTP_NOT_SUPPORTED", opens_circuit=True)
    return Classification(UNKNOWN, "SMTP_ERROR")


def meta_error_code(body: object) -> int | None:
    """``error.code`` of a Graph API error body (decoded JSON, or its text/bytes), else None."""
    error = _as_json(body)
    error = error.get("error") if isinstance(error, Mapping) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.strip().lstrip("-").isdigit():
        return int(code)
    return None


def meta_error_message(body: object) -> str:
    """``error.message`` of a Graph API error body without its ``(#code)`` prefix ('' when absent)."""
    error = _as_json(body)
    error = error.get("error") if isinstance(error, Mapping) else None
    message = error.get("message") if isinstance(error, Mapping) else None
    if not isinstance(message, str):
        return ""
    return re.sub(r"^\(#\d+\)\s*", "", message).strip()


def wachap_error_message(body: object) -> str:
    """The human message of a WaChap answer (``message``, ``msg``, ``error`` or ``errors``), else its text."""
    data = _as_json(body)
    if isinstance(data, Mapping):
        parts = [data[key] for key in ("message", "msg", "error", "errors") if data.get(key)]
        return " ".join(part if isinstance(part, str) else json.dumps(part, default=str) for part in parts)
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return body if isinstance(body, str) else ""


def _classify_status(status: int, retry_after_s: float | None) -> Classification:
    return Classification(
        HTTP_STATUS_KINDS.get(status, UNKNOWN),
        f"HTTP_{status}",
        retry_after_s,
        opens_circuit=status in HTTP_STATUS_OPENS_CIRCUIT,
    )


def _as_json(body: object) -> object:
    if isinstance(body, bytes | bytearray):
        body = bytes(body).decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return None
    return body


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)  # httpx.Headers is case-insensitive; a plain dict may not be
    if value is not None:
        return value
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None
