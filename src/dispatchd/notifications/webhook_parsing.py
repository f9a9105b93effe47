"""Reading a WhatsApp Cloud API webhook delivery, before anything is written.

Source: Meta Cloud API "Webhooks" docs (the ``statuses`` and ``messages`` objects of the ``messages``
field). A delivery is ``{"object": "whatsapp_business_account", "entry": [{"changes": [{"value":
{...}}]}]}``; timestamps are unix seconds, read as UTC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dispatchd.core.errors import DispatchdError
from dispatchd.notifications.inbox import Received

WHATSAPP_OBJECT = "whatsapp_business_account"

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


@dataclass(frozen=True)
class StatusUpdate:
    """One ``value.statuses[]`` object. ``at`` is the provider's timestamp (UTC)."""

    wamid: str
    status: str
    at: datetime
    error_code: str | None = None
    error_text: str | None = None


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


def _parse_message(item: dict[str, Any], where: str) -> Received:
    sender = _str_or_none(item.get("from"))
    # Users known only by a business-scoped user id (no phone shared) cannot be matched to a driver.
    from_phone = f"+{sender}" if sender else (_str_or_none(item.get("from_user_id")) or "")
    text, button_id = _text_and_button(item)
    context = item.get("context") if isinstance(item.get("context"), dict) else {}
    timestamp = item.get("timestamp")
    return Received(
        wamid=_wamid(item.get("id"), f"{where}.id"),
        from_phone=from_phone[:40],
        type=(_str_or_none(item.get("type")) or "unknown")[:30],
        text=text,
        button_id=button_id,
        context_message_id=_str_or_none(context.get("id")),
        sent_at=_timestamp(timestamp, f"{where}.timestamp") if timestamp is not None else None,
        raw=item,
    )


#: Deepest nesting kept from a delivery (Meta's are about 8 deep); deeper parts are replaced by ``"…"``.
MAX_DEPTH = 32


def clean_text(text: str) -> str:
    """``text`` as a database stores it: NUL characters dropped, lone surrogates (``\\ud800``, which
    json.loads lets through) replaced by U+FFFD."""
    text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def sanitize(value: Any, depth: int = 1) -> Any:
    """A copy of a decoded delivery that both databases store: every key and string cleaned
    (:func:`clean_text`), anything nested deeper than :data:`MAX_DEPTH` replaced by ``"…"`` (the
    recursion is bounded by that depth, however deep the input)."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict | list):
        if depth > MAX_DEPTH:
            return "…"
        if isinstance(value, dict):
            return {clean_text(str(k)): sanitize(v, depth + 1) for k, v in value.items()}
        return [sanitize(v, depth + 1) for v in value]
    return value


def decode_delivery(body: bytes) -> Any:
    """The raw body as JSON, sanitized (:func:`sanitize`). Raises :class:`MalformedJson` when it is not
    UTF-8 JSON or is nested too deeply for the parser (``RecursionError``)."""
    try:
        return sanitize(json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError):  # JSONDecodeError is a ValueError
        raise MalformedJson("the request body is not valid JSON") from None


def parse_delivery(payload: Any) -> tuple[list[StatusUpdate], list[Received]]:
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
    messages: list[Received] = []
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
