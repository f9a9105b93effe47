"""WhatsApp Cloud API webhooks, under ``/v1/webhooks``: delivery statuses and inbound messages from Meta.

Source: Meta Cloud API "Webhooks" docs (verification request, ``X-Hub-Signature-256`` payload signing,
the ``statuses`` and ``messages`` objects of the ``messages`` field).

* ``GET /v1/webhooks/whatsapp``: the subscription handshake; echoes ``hub.challenge`` when
  ``hub.verify_token`` equals ``settings.whatsapp_verify_token``.
* ``POST /v1/webhooks/whatsapp``: one delivery (``object`` → ``entry[]`` → ``changes[]`` → ``value``).
  Authenticated by the HMAC-SHA256 of the raw body with ``settings.whatsapp_app_secret`` (no API key:
  Meta calls these routes). Status updates move the matching :class:`Notification` forward, never
  backward; inbound messages are stored once per provider id (Meta re-delivers), and a driver's
  ``ACCEPT:<booking_id>`` / ``REJECT:<booking_id>`` button tap is handed to
  :meth:`MatchingService.respond`.

All times are timezone-aware UTC; provider timestamps are unix seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import Database, lock_for_update, retry_transient
from dispatchd.core.errors import DispatchdError, Forbidden, Unauthorized
from dispatchd.core.ids import new_id
from dispatchd.core.logging import get_logger
from dispatchd.matching.models import Driver
from dispatchd.matching.service import MatchingService
from dispatchd.notifications.models import InboundMessage, Notification, NotificationStatus

log = get_logger("dispatchd.webhooks")

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_PREFIX = "sha256="
WHATSAPP_OBJECT = "whatsapp_business_account"

#: Reply-button ids of driver offers (see ``matching.service``): ``ACCEPT:bkg_…`` / ``REJECT:bkg_…``.
OFFER_BUTTON = re.compile(r"^(ACCEPT|REJECT):(bkg_[0-9a-f]+)$")

#: Delivery progress; a status is applied only when its rank is not below the current one.
RANK = {NotificationStatus.SENT: 1, NotificationStatus.DELIVERED: 2, NotificationStatus.READ: 3}
#: Meta status → ours, for the ranked ones (``failed`` is handled apart; others are ignored).
RANKED_STATUSES = {
    "sent": NotificationStatus.SENT,
    "delivered": NotificationStatus.DELIVERED,
    "read": NotificationStatus.READ,
}

#: ``InboundMessage.outcome`` values besides the :class:`Action` of ``respond``.
OUTCOME_STORED = "STORED"
OUTCOME_UNKNOWN_DRIVER = "UNKNOWN_DRIVER"
OUTCOME_ROUTING_FAILED = "ROUTING_FAILED"

_ID_MAX = 200  # provider_message_id, button_id, context_message_id columns


class WebhookNotConfigured(DispatchdError):
    """The secret this route checks against is not set (``DISPATCHD_WHATSAPP_*``)."""

    status = 503
    code = "WEBHOOK_NOT_CONFIGURED"
    title = "Webhook not configured"


class MalformedJson(DispatchdError):
    status = 400
    code = "MALFORMED_JSON"
    title = "Malformed JSON"


class InvalidWebhookPayload(DispatchdError):
    """Valid JSON, but not a ``whatsapp_business_account`` delivery we can read."""

    status = 400
    code = "VALIDATION_ERROR"
    title = "Invalid webhook payload"


class WebhookAck(BaseModel):
    """What one delivery contained: ``statuses`` and ``messages`` count every object received;
    ``unmatched`` of the statuses named no known notification, ``duplicates`` of the messages were
    already stored (re-deliveries)."""

    received: bool = True
    statuses: int
    messages: int
    duplicates: int
    unmatched: int


# ------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class StatusUpdate:
    """One ``value.statuses[]`` object. ``at`` is the provider's timestamp (UTC)."""

    wamid: str
    status: str
    at: datetime
    error_code: str | None = None
    error_text: str | None = None


@dataclass(frozen=True)
class Inbound:
    """One ``value.messages[]`` object, reduced to the columns of :class:`InboundMessage`."""

    wamid: str
    from_phone: str
    type: str
    text: str | None
    button_id: str | None
    context_message_id: str | None
    sent_at: datetime | None
    raw: dict[str, Any]


def _invalid(where: str, what: str) -> InvalidWebhookPayload:
    return InvalidWebhookPayload(f"{where}: {what}")


def _list_of_dicts(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _invalid(where, "must be a list of objects")
    return value


def _wamid(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _ID_MAX:
        raise _invalid(where, f"must be a non-empty string of at most {_ID_MAX} characters")
    return value


def _timestamp(value: Any, where: str) -> datetime:
    """Unix seconds (Meta sends a string of digits) → aware UTC datetime."""
    try:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError
        return datetime.fromtimestamp(int(value), UTC)
    except (ValueError, OverflowError, OSError):
        raise _invalid(where, "must be unix seconds") from None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value != "" else None


def _parse_status(item: dict[str, Any], where: str) -> StatusUpdate:
    status = item.get("status")
    if not isinstance(status, str):
        raise _invalid(f"{where}.status", "must be a string")
    error_code = error_text = None
    errors = _list_of_dicts(item.get("errors"), f"{where}.errors")
    if errors:
        first = errors[0]
        code = first.get("code")
        error_code = f"META_{code}"[:40] if code is not None else "META_UNKNOWN"
        title, message = _str_or_none(first.get("title")), _str_or_none(first.get("message"))
        parts = [title] if title else []
        if message and message != title:
            parts.append(message)
        error_data = first.get("error_data")
        details = _str_or_none(error_data.get("details")) if isinstance(error_data, dict) else None
        if details:
            parts.append(details)
        error_text = "; ".join(parts)[:2000] or None
    return StatusUpdate(
        wamid=_wamid(item.get("id"), f"{where}.id"),
        status=status,
        at=_timestamp(item.get("timestamp"), f"{where}.timestamp"),
        error_code=error_code,
        error_text=error_text,
    )


def _text_and_button(message: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(text, button_id)``: the body or title the user sees, and the id of the button tapped."""
    kind = message.get("type")
    body = message.get(kind) if isinstance(kind, str) else None
    if not isinstance(body, dict):
        return None, None
    if kind == "text":
        return _str_or_none(body.get("body")), None
    if kind == "button":  # template quick reply
        return _str_or_none(body.get("text")), _str_or_none(body.get("payload"))
    if kind == "interactive":
        for reply_kind in ("button_reply", "list_reply"):
            reply = body.get(reply_kind)
            if isinstance(reply, dict):
                return _str_or_none(reply.get("title")), _str_or_none(reply.get("id"))
        return None, None
    return _str_or_none(body.get("caption")), None  # image, video, document


def _parse_message(item: dict[str, Any], where: str) -> Inbound:
    sender = _str_or_none(item.get("from"))
    # Users known only by a business-scoped user id (no phone shared) cannot be matched to a driver.
    from_phone = f"+{sender}" if sender else (_str_or_none(item.get("from_user_id")) or "")
    text, button_id = _text_and_button(item)
    context = item.get("context") if isinstance(item.get("context"), dict) else {}
    timestamp = item.get("timestamp")
    return Inbound(
        wamid=_wamid(item.get("id"), f"{where}.id"),
        from_phone=from_phone[:40],
        type=(_str_or_none(item.get("type")) or "unknown")[:30],
        text=text,
        button_id=button_id,
        context_message_id=_str_or_none(context.get("id")),
        sent_at=_timestamp(timestamp, f"{where}.timestamp") if timestamp is not None else None,
        raw=item,
    )


def parse_delivery(payload: Any) -> tuple[list[StatusUpdate], list[Inbound]]:
    """Read a whole delivery before anything is written. Raises :class:`InvalidWebhookPayload` when it is
    not ``{"object": "whatsapp_business_account", "entry": [...]}`` or a status / message lacks its id,
    status or a readable timestamp."""
    if not isinstance(payload, dict):
        raise _invalid("body", "must be a JSON object")
    if payload.get("object") != WHATSAPP_OBJECT:
        raise _invalid("object", f"must be {WHATSAPP_OBJECT!r}")
    if not isinstance(payload.get("entry"), list):
        raise _invalid("entry", "must be a list")
    statuses: list[StatusUpdate] = []
    messages: list[Inbound] = []
    for e, entry in enumerate(_list_of_dicts(payload["entry"], "entry")):
        for c, change in enumerate(_list_of_dicts(entry.get("changes"), f"entry[{e}].changes")):
            value = change.get("value")
            where = f"entry[{e}].changes[{c}].value"
            if value is None:
                continue
            if not isinstance(value, dict):
                raise _invalid(where, "must be an object")
            for s, item in enumerate(_list_of_dicts(value.get("statuses"), f"{where}.statuses")):
                statuses.append(_parse_status(item, f"{where}.statuses[{s}]"))
            for m, item in enumerate(_list_of_dicts(value.get("messages"), f"{where}.messages")):
                messages.append(_parse_message(item, f"{where}.messages[{m}]"))
    return statuses, messages


# --------------------------------------------------------------------------------------- applying


def apply_status(
    notification: Notification,
    update_: StatusUpdate,
    templates: Mapping[str, Mapping[str, Any]] | None = None,
) -> bool:
    """Move ``notification`` forward with one provider status; True when anything changed.

    ``sent`` < ``delivered`` < ``read``: a status ranked below the current one changes nothing (Meta does
    not guarantee order). ``failed`` → FAILED_PERMANENT with ``error_code`` ``META_<code>``, unless the
    message was already DELIVERED or READ — except ``META_131047`` (the 24 h window closed) when
    ``templates`` has the message's category: then it goes back to PENDING to be re-sent as that approved
    template, as a synchronous 131047 would. Rows not in SENT / DELIVERED / READ (failed, cancelled…) are
    left alone; ``played`` and other statuses are ignored.
    """
    current = NotificationStatus(notification.status)
    if current not in RANK:
        return False
    if update_.status == "failed":
        if current is not NotificationStatus.SENT:
            return False
        notification.error_code = update_.error_code or "META_UNKNOWN"
        notification.last_error = update_.error_text or "failed (no error detail from the provider)"
        notification.failed_at = update_.at
        template = (templates or {}).get(notification.category)
        payload = notification.payload or {}
        if notification.error_code == "META_131047" and template and "template" not in payload:
            parameters = [notification.body[:1000]] if template.get("body_parameter", True) else []
            notification.payload = {**payload, "template": {**template, "parameters": parameters}}
            notification.status = NotificationStatus.PENDING.value
            notification.error_kind = "WINDOW_CLOSED"
            notification.next_attempt_at = update_.at
        else:
            notification.status = NotificationStatus.FAILED_PERMANENT.value
            notification.error_kind = "PERMANENT"
            notification.next_attempt_at = None
    else:
        target = RANKED_STATUSES.get(update_.status)
        if target is None or RANK[target] < RANK[current]:
            return False
        notification.status = target.value
        if target is NotificationStatus.DELIVERED:
            notification.delivered_at = _earliest(notification.delivered_at, update_.at)
        elif target is NotificationStatus.READ:
            notification.read_at = _earliest(notification.read_at, update_.at)
    if notification.status_at is None or update_.at > notification.status_at:
        notification.status_at = update_.at
    return True


def _earliest(current: datetime | None, new: datetime) -> datetime:
    return new if current is None or new < current else current


@dataclass
class _Counts:
    statuses: int = 0
    unmatched: int = 0
    messages: int = 0
    duplicates: int = 0


@dataclass(frozen=True)
class _Tap:
    """A new driver reply to route once the message is committed."""

    inbound_id: str
    from_phone: str
    answer: str
    booking_id: str


async def _apply_statuses(
    session: AsyncSession,
    statuses: list[StatusUpdate],
    counts: _Counts,
    templates: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    counts.statuses += len(statuses)
    wamids = sorted({status.wamid for status in statuses})
    found: dict[str, list[Notification]] = {}
    for start in range(0, len(wamids), 500):
        chunk = wamids[start : start + 500]
        # Locked in one order (provider id, id) so that concurrent deliveries cannot deadlock, and so
        # that two updates of one message never both read the old status.
        query = lock_for_update(
            select(Notification)
            .where(Notification.provider_message_id.in_(chunk))
            .order_by(Notification.provider_message_id, Notification.id)
            .execution_options(populate_existing=True)
        )
        for notification in (await session.scalars(query)).all():
            found.setdefault(notification.provider_message_id or "", []).append(notification)
    for status in statuses:
        notifications = found.get(status.wamid)
        if not notifications:
            counts.unmatched += 1
            continue
        for notification in notifications:
            apply_status(notification, status, templates)


async def _store_messages(session: AsyncSession, messages: list[Inbound], counts: _Counts) -> list[_Tap]:
    counts.messages += len(messages)
    wamids = sorted({message.wamid for message in messages})
    known: set[str] = set()
    for start in range(0, len(wamids), 500):
        chunk = wamids[start : start + 500]
        rows = await session.scalars(
            select(InboundMessage.provider_message_id).where(InboundMessage.provider_message_id.in_(chunk))
        )
        known.update(rows.all())
    now: datetime = session.info["now"]
    taps: list[_Tap] = []
    for message in sorted(messages, key=lambda message: message.wamid):
        if message.wamid in known:
            counts.duplicates += 1
            continue
        known.add(message.wamid)
        button = OFFER_BUTTON.match(message.button_id or "")
        row = InboundMessage(
            id=new_id("inb"),
            provider_message_id=message.wamid,
            from_phone=message.from_phone,
            type=message.type,
            text=message.text,
            button_id=message.button_id[:_ID_MAX] if message.button_id else None,
            context_message_id=message.context_message_id[:_ID_MAX] if message.context_message_id else None,
            sent_at=message.sent_at,
            received_at=now,
            outcome=None if button else OUTCOME_STORED,
            raw=message.raw,
        )
        try:
            async with session.begin_nested():
                session.add(row)
                await session.flush()
        except IntegrityError:  # a concurrent delivery of the same message committed first
            counts.duplicates += 1
            continue
        if button:
            taps.append(_Tap(row.id, message.from_phone, button.group(1), button.group(2)))
    return taps


@retry_transient
async def _record(
    db: Database,
    statuses: list[StatusUpdate],
    messages: list[Inbound],
    templates: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[_Counts, list[_Tap]]:
    """One unit of work for the whole delivery (re-run from the start after a deadlock)."""
    counts = _Counts()
    async with db.transaction() as session:
        await _apply_statuses(session, statuses, counts, templates)
        taps = await _store_messages(session, messages, counts)
    return counts, taps


async def _route(db: Database, matching: MatchingService, taps: list[_Tap]) -> None:
    """Hand each new driver tap to ``respond`` (its own transaction), then record the outcomes."""
    outcomes: dict[str, str] = {}
    for tap in taps:
        async with db.read() as session:
            driver_id = await session.scalar(select(Driver.id).where(Driver.phone == tap.from_phone))
        if driver_id is None:
            outcomes[tap.inbound_id] = OUTCOME_UNKNOWN_DRIVER
            continue
        try:
            result = await matching.respond(tap.booking_id, driver_id, tap.answer)
            outcomes[tap.inbound_id] = result.action.value
        except DispatchdError as exc:  # BOOKING_NOT_FOUND, OFFER_NOT_FOUND
            outcomes[tap.inbound_id] = exc.code
        except Exception:
            # Meta would re-deliver on an error answer, but a re-delivery is a duplicate and is not
            # routed again: record the failure on the message instead.
            log.exception(
                "routing a driver reply failed", inbound_id=tap.inbound_id, booking_id=tap.booking_id
            )
            outcomes[tap.inbound_id] = OUTCOME_ROUTING_FAILED
        log.info(
            "driver reply routed",
            inbound_id=tap.inbound_id,
            booking_id=tap.booking_id,
            driver_id=driver_id,
            answer=tap.answer,
            outcome=outcomes[tap.inbound_id],
        )
    if outcomes:
        async with db.transaction() as session:
            for inbound_id, outcome in outcomes.items():
                await session.execute(
                    update(InboundMessage).where(InboundMessage.id == inbound_id).values(outcome=outcome)
                )


# ----------------------------------------------------------------------------------------- routes


def _secret(value: Any, setting: str) -> bytes:
    if value is None or not value.get_secret_value():
        raise WebhookNotConfigured(f"set DISPATCHD_{setting.upper()} to enable the WhatsApp webhook")
    return value.get_secret_value().encode()


def verify_signature(app_secret: bytes, body: bytes, header: str | None) -> None:
    """Check ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`` in constant time.

    Raises :class:`Unauthorized` when the header is missing, :class:`Forbidden` when it does not match.
    """
    if not header:
        raise Unauthorized(f"missing {SIGNATURE_HEADER}")
    expected = SIGNATURE_PREFIX + hmac.new(app_secret, body, hashlib.sha256).hexdigest()
    given = header.strip().lower().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(expected.encode(), given):
        raise Forbidden(f"{SIGNATURE_HEADER} does not match the body")


@router.get(
    "/whatsapp",
    response_class=PlainTextResponse,
    summary="WhatsApp webhook verification (Meta subscription handshake)",
    responses={403: {"description": "Wrong mode or verify token"}, 503: {"description": "No verify token"}},
)
async def verify_subscription(
    request: Request,
    mode: str | None = Query(None, alias="hub.mode"),
    verify_token: str | None = Query(None, alias="hub.verify_token", max_length=1000),
    challenge: str = Query(..., alias="hub.challenge", max_length=1000),
) -> PlainTextResponse:
    """Answer ``hub.challenge`` as ``text/plain`` when ``hub.mode`` is ``subscribe`` and ``hub.verify_token``
    equals the configured token. Raises :class:`WebhookNotConfigured` (503) without a token configured,
    :class:`Forbidden` (403) otherwise."""
    expected = _secret(request.app.state.settings.whatsapp_verify_token, "whatsapp_verify_token")
    token_ok = hmac.compare_digest(expected, (verify_token or "").encode("utf-8", "surrogateescape"))
    if mode != "subscribe" or not token_ok:
        raise Forbidden("wrong hub.mode or hub.verify_token")
    return PlainTextResponse(challenge)


@router.post(
    "/whatsapp",
    response_model=WebhookAck,
    summary="WhatsApp webhook delivery: message statuses and inbound messages",
    responses={
        400: {"description": "Malformed JSON or not a whatsapp_business_account delivery"},
        401: {"description": "No X-Hub-Signature-256"},
        403: {"description": "X-Hub-Signature-256 does not match"},
        503: {"description": "No app secret configured"},
    },
)
async def receive(request: Request) -> WebhookAck:
    """Apply one signed delivery. Statuses and new messages commit together in one transaction; driver
    taps are then routed to matching. Raises :class:`WebhookNotConfigured` (503), :class:`Unauthorized`
    (401), :class:`Forbidden` (403), :class:`MalformedJson` or :class:`InvalidWebhookPayload` (400)."""
    app_secret = _secret(request.app.state.settings.whatsapp_app_secret, "whatsapp_app_secret")
    body = await request.body()
    verify_signature(app_secret, body, request.headers.get(SIGNATURE_HEADER))
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedJson("the request body is not valid JSON") from None
    statuses, messages = parse_delivery(payload)
    db: Database = request.app.state.db
    counts, taps = await _record(db, statuses, messages, request.app.state.settings.whatsapp_templates)
    if taps:
        await _route(db, request.app.state.matching, taps)
    return WebhookAck(
        statuses=counts.statuses,
        messages=counts.messages,
        duplicates=counts.duplicates,
        unmatched=counts.unmatched,
    )
