"""WhatsApp Cloud API webhooks, under ``/v1/webhooks``: delivery statuses and inbound messages from Meta.

Source: Meta Cloud API "Webhooks" docs (verification request, ``X-Hub-Signature-256`` payload signing,
the ``statuses`` and ``messages`` objects of the ``messages`` field).

* ``GET /v1/webhooks/whatsapp``: the subscription handshake; echoes ``hub.challenge`` when
  ``hub.verify_token`` equals ``settings.whatsapp_verify_token``.
* ``POST /v1/webhooks/whatsapp``: one delivery (``object`` → ``entry[]`` → ``changes[]`` → ``value``).
  Authenticated by the HMAC-SHA256 of the raw body with ``settings.whatsapp_app_secret`` (no API key:
  Meta calls these routes). Status updates move the matching :class:`Notification` forward, never
  backward (:mod:`.statuses`); inbound messages are stored once per provider id in the inbox
  (:mod:`.inbox`) and routed to the domains' handlers: a driver's ``ACCEPT:<booking_id>`` tap, a
  customer's text…

All times are timezone-aware UTC; provider timestamps are unix seconds.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError

from dispatchd.core import events, idempotency, topics
from dispatchd.core.db import Database, retry_transient
from dispatchd.core.errors import DispatchdError, Forbidden, Unauthorized
from dispatchd.core.logging import get_logger
from dispatchd.notifications import inbox
from dispatchd.notifications.inbox import Received
from dispatchd.notifications.statuses import apply_statuses
from dispatchd.notifications.webhook_parsing import (
    InvalidWebhookPayload,
    MalformedJson,
    StatusUpdate,
    WebhookNotConfigured,
    clean_text,
    decode_delivery,
    parse_delivery,
)

__all__ = ["InvalidWebhookPayload", "MalformedJson", "WebhookNotConfigured", "parse_delivery", "router"]

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
log = get_logger("dispatchd.webhooks")

SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_PREFIX = "sha256="


class WebhookAck(BaseModel):
    """What one delivery contained: ``statuses`` and ``messages`` count every object received;
    ``unmatched`` of the statuses named no known notification, ``duplicates`` of the messages were
    already stored (re-deliveries)."""

    received: bool = True
    rejected: bool = Field(
        default=False,
        description="True when this exact delivery was refused before (400, kept for inspection): "
        "acknowledged so that Meta stops re-sending it",
    )
    statuses: int
    messages: int
    duplicates: int
    unmatched: int


@retry_transient
async def _record(
    db: Database,
    statuses: list[StatusUpdate],
    messages: list[Received],
    templates: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[WebhookAck, list[str]]:
    """One unit of work for the whole delivery (re-run from the start after a deadlock): the statuses
    applied and the new messages stored, due for routing. Returns the answer and the new message ids."""
    async with db.transaction() as session:
        unmatched = await apply_statuses(session, statuses, templates)
        stored, duplicates = await inbox.store(session, messages)
    ack = WebhookAck(
        statuses=len(statuses), messages=len(messages), duplicates=duplicates, unmatched=unmatched
    )
    return ack, stored


async def _keep_rejected(db: Database, body: bytes, error: DispatchdError) -> bool:
    """Keep a signed delivery that cannot be read, for inspection: a ``WebhookRejected`` event on the
    staff-only ``notifications`` topic (its SHA-256, size, the error and the first 2 KB, cleaned) and a
    row in ``idempotent_requests`` keyed by the digest. Returns True the first time (answered 400),
    False for a re-delivery of the same bytes (answered 200, so Meta stops re-sending it)."""
    digest = hashlib.sha256(body).hexdigest()
    scope = f"webhook-rejected:{digest}"
    excerpt = clean_text(body[:2048].decode("utf-8", "replace"))
    data = {"sha256": digest, "bytes": len(body), "code": error.code, "detail": error.detail}
    try:
        async with db.transaction() as session:
            if await session.get(idempotency.IdempotentRequest, scope) is not None:
                return False
            idempotency.remember(session, scope, digest, error.status, {**data, "excerpt": excerpt})
            events.append(session, topics.NOTIFICATIONS, "WebhookRejected", {**data, "excerpt": excerpt})
    except IntegrityError:  # the same delivery, kept concurrently
        return False
    log.warning("webhook delivery rejected", code=error.code, detail=error.detail, sha256=digest)
    return True


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
    expected = _secret(request.app.state.services.settings.whatsapp_verify_token, "whatsapp_verify_token")
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
    """Apply one signed delivery. Statuses and new messages commit together in one transaction; the new
    messages are then routed (unless ``DISPATCHD_INBOUND_ROUTE_INLINE`` is off: then by the sweeper, as
    after a crash). Raises :class:`WebhookNotConfigured` (503), :class:`Unauthorized`
    (401), :class:`Forbidden` (403), :class:`MalformedJson` or :class:`InvalidWebhookPayload` (400)."""
    app_secret = _secret(request.app.state.services.settings.whatsapp_app_secret, "whatsapp_app_secret")
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:  # refused before the body is read (it is capped by DISPATCHD_WEBHOOK_MAX_BODY_BYTES)
        raise Unauthorized(f"missing {SIGNATURE_HEADER}")
    body = await request.body()
    verify_signature(app_secret, body, signature)
    services = request.app.state.services
    try:
        statuses, messages = parse_delivery(decode_delivery(body))
    except (MalformedJson, InvalidWebhookPayload) as exc:
        if await _keep_rejected(services.db, body, exc):
            raise
        return WebhookAck(statuses=0, messages=0, duplicates=0, unmatched=0, rejected=True)
    ack, stored = await _record(services.db, statuses, messages, services.settings.whatsapp_templates)
    if stored and services.settings.inbound_route_inline:
        await services.inbox.route(services.db, stored)
    return ack
