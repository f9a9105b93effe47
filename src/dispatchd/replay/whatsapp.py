"""The WhatsApp fleet's pure pieces: reading the offer messages the fake WhatsApp Cloud API recorded
(``GET /messages``), choosing a driver's tap, and building the signed Meta webhook that carries it to
``POST /v1/webhooks/whatsapp``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

WEBHOOK_PATH = "/v1/webhooks/whatsapp"
SIGNATURE_HEADER = "X-Hub-Signature-256"
#: The business number the simulated drivers write to (metadata of the webhooks; any value works).
BUSINESS_DISPLAY_PHONE = "15550001234"
#: Reply ids of driver offers (buttons and list rows), as ``matching`` writes them.
OFFER_REPLY_ID = re.compile(r"^(ACCEPT|REJECT):(bkg_[0-9a-f]+)$")


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


@dataclass(frozen=True)
class OfferChoice:
    """One offer a WhatsApp message lets the driver answer: the reply ``id``/``title`` that accepts it,
    and the one that refuses it when the message has one (a coalesced message has only ACCEPT replies)."""

    booking_id: str
    accept_id: str
    accept_title: str
    reject_id: str | None = None
    reject_title: str | None = None


@dataclass(frozen=True)
class WhatsAppOffer:
    """An offer message as sent to the fake: ``to`` (digits, no ``+``), the ``wamid`` the fake answered,
    ``kind`` ``"button"`` (≤ 3 reply buttons) or ``"list"`` (list rows), and the offers in the order the
    message lists them (nearest first)."""

    to: str
    wamid: str | None
    kind: Literal["button", "list"]
    choices: tuple[OfferChoice, ...]
    phone_number_id: str | None = None


def offers_in_message(message: Mapping[str, Any]) -> WhatsAppOffer | None:
    """Read a message recorded by the fake (``GET /messages``: Meta's request JSON plus ``wamid``): the
    offers it carries, or None when it is not an interactive message with at least one
    ``ACCEPT:bkg_<hex>`` reply (text, template, "course prise"…). Buttons are
    ``interactive.action.buttons[].reply{id,title}``; list rows ``interactive.action.sections[].rows[]``.
    """
    if message.get("type") != "interactive":
        return None
    interactive = message.get("interactive")
    if not isinstance(interactive, dict):
        return None
    action = interactive.get("action") if isinstance(interactive.get("action"), dict) else {}
    kind = interactive.get("type")
    replies: list[tuple[str, str]] = []
    if kind == "button":
        for button in action.get("buttons") or []:
            reply = button.get("reply") if isinstance(button, dict) else None
            if isinstance(reply, dict):
                replies.append((str(reply.get("id", "")), str(reply.get("title", ""))))
    elif kind == "list":
        for section in action.get("sections") or []:
            for row in (section.get("rows") or []) if isinstance(section, dict) else []:
                if isinstance(row, dict):
                    replies.append((str(row.get("id", "")), str(row.get("title", ""))))
    else:
        return None
    accepts: dict[str, tuple[str, str]] = {}
    rejects: dict[str, tuple[str, str]] = {}
    for reply_id, title in replies:
        matched = OFFER_REPLY_ID.match(reply_id)
        if matched:
            target = accepts if matched.group(1) == "ACCEPT" else rejects
            target.setdefault(matched.group(2), (reply_id, title))
    if not accepts:
        return None
    choices = tuple(
        OfferChoice(
            booking_id,
            accept_id,
            accept_title,
            *(rejects.get(booking_id) or (None, None)),
        )
        for booking_id, (accept_id, accept_title) in accepts.items()
    )
    wamid = message.get("wamid")
    phone_number_id = message.get("phone_number_id")
    return WhatsAppOffer(
        to=str(message.get("to", "")).removeprefix("+"),
        wamid=str(wamid) if wamid else None,
        kind="button" if kind == "button" else "list",
        choices=choices,
        phone_number_id=str(phone_number_id) if phone_number_id else None,
    )


def choose_reply(
    offer: WhatsAppOffer, *, accept: bool, closed: Iterable[str] = ()
) -> tuple[Literal["ACCEPT", "REJECT"], str, str, str] | None:
    """What a driver taps on ``offer``: ``(answer, reply id, title, booking id)``, or None to leave it.

    ``closed`` are bookings the driver knows are gone (resolved, or already answered by them). With
    ``accept`` the first listed open offer (nearest first) is accepted; otherwise the first open offer
    with a refuse reply is refused, and a message without one (several offers) is left unanswered.
    """
    closed = set(closed)
    open_choices = [choice for choice in offer.choices if choice.booking_id not in closed]
    if not open_choices:
        return None
    if accept:
        choice = open_choices[0]
        return "ACCEPT", choice.accept_id, choice.accept_title, choice.booking_id
    for choice in open_choices:
        if choice.reject_id:
            return "REJECT", choice.reject_id, choice.reject_title or "", choice.booking_id
    return None


def webhook_reply_payload(
    *,
    from_wa_id: str,
    reply_kind: Literal["button_reply", "list_reply"],
    reply_id: str,
    title: str,
    wamid: str,
    timestamp: int,
    context_wamid: str | None = None,
    phone_number_id: str = "0",
    display_phone_number: str = BUSINESS_DISPLAY_PHONE,
    profile_name: str = "Driver",
) -> dict[str, Any]:
    """A Meta webhook delivery of one interactive reply (a tap on a reply button or a list row), shaped
    like Meta's (``object`` → ``entry[]`` → ``changes[]`` → ``value`` with ``metadata``, ``contacts`` and
    one ``messages[]`` item of ``type`` ``interactive``). ``from_wa_id`` is the user's phone without
    ``+``; ``wamid`` must be unique per tap (Meta re-deliveries repeat it); ``context_wamid`` is the id of
    the message tapped; ``timestamp`` is unix seconds."""
    message: dict[str, Any] = {
        "from": from_wa_id,
        "id": wamid,
        "timestamp": str(timestamp),
        "type": "interactive",
        "interactive": {"type": reply_kind, reply_kind: {"id": reply_id, "title": title}},
    }
    if context_wamid:
        message = {"context": {"from": display_phone_number, "id": context_wamid}, **message}
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": phone_number_id,
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": display_phone_number,
                                "phone_number_id": phone_number_id,
                            },
                            "contacts": [{"profile": {"name": profile_name}, "wa_id": from_wa_id}],
                            "messages": [message],
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }


def sign_webhook(app_secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value Meta sends: ``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
