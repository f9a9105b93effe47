"""The ``whatsapp_cloud`` channel: Meta's WhatsApp Cloud API (Graph API ``POST /{phone-number-id}/messages``).

Request shapes follow the Cloud API "Messages" reference
(https://developers.facebook.com/docs/whatsapp/cloud-api/reference/messages): free text (body ≤ 4096
characters), interactive reply buttons (≤ 3 buttons, titles ≤ 20 characters, body ≤ 1024) and approved
templates (used when the 24 h customer-service window is closed). A success answers
``{"messaging_product": "whatsapp", "contacts": [...], "messages": [{"id": "wamid...."}]}``; failures are
classified by :func:`dispatchd.notifications.classify.classify_http` (Meta's "Error codes" page).
The access token is sent only in the ``Authorization`` header and never appears in an error.
"""

from __future__ import annotations

from typing import Any

import httpx

from dispatchd.notifications.channels.base import ChannelError, OutboundMessage, SendResult
from dispatchd.notifications.channels.http import RAW_MAX, HttpChannel
from dispatchd.notifications.classify import (
    classify_http,
    classify_transport,
    meta_error_code,
    meta_error_message,
)

TEXT_MAX = 4096
INTERACTIVE_BODY_MAX = 1024
BUTTON_TITLE_MAX = 20
BUTTON_ID_MAX = 256
BUTTONS_MAX = 3
LIST_BUTTON_MAX = 20
LIST_ROWS_MAX = 10
LIST_ROW_TITLE_MAX = 24
LIST_ROW_DESCRIPTION_MAX = 72
LIST_ROW_ID_MAX = 200
DEFAULT_TEMPLATE_LANGUAGE = "en_US"


class WhatsAppCloudChannel(HttpChannel):
    """Sends one message per call to ``{base_url}/{phone_number_id}/messages``.

    ``base_url`` pins the Graph API version (e.g. ``https://graph.facebook.com/v21.0``). When ``http`` is
    given the caller owns it (``aclose`` leaves it open); ``timeout_s`` bounds each request, in seconds;
    ``http2`` (``off``, ``alpn``, ``prior_knowledge``) as in :mod:`dispatchd.notifications.channels.http`.
    """

    name = "whatsapp_cloud"

    def __init__(
        self,
        base_url: str,
        phone_number_id: str,
        access_token: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 10.0,
        http2: str = "off",
    ) -> None:
        self._url = f"{base_url.rstrip('/')}/{phone_number_id}/messages"
        super().__init__(access_token, http=http, timeout_s=timeout_s, http2=http2)

    def __repr__(self) -> str:
        return f"WhatsAppCloudChannel(url={self._url!r})"

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the message; return its ``wamid`` or raise :class:`ChannelError` (classified)."""
        try:
            response = await self._http.post(
                self._url,
                json=build_payload(message),
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self._timeout_s,
            )
        except httpx.HTTPError as exc:
            raise ChannelError(
                self._scrub(f"WhatsApp Cloud request failed: {type(exc).__name__}: {exc}"),
                classify_transport(exc),
            ) from None
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        if response.is_success:
            wamid = _message_id(body)
            if wamid is not None:
                return SendResult(provider_message_id=wamid)
        code = meta_error_code(body)
        if code is not None:
            detail = f"Meta {code}: {meta_error_message(body) or 'error'}"
        elif response.is_success:
            detail = f"HTTP {response.status_code}: answer without messages[0].id"
        else:
            detail = f"HTTP {response.status_code}: {response.reason_phrase}"
        raise ChannelError(
            self._scrub(detail),
            classify_http(response.status_code, body, response.headers),
            raw=self._scrub(response.text)[:RAW_MAX],
        )


def build_payload(message: OutboundMessage) -> dict[str, Any]:
    """The Cloud API JSON body for ``message``: a template when ``message.template`` is set, reply buttons
    when ``message.payload["buttons"]`` lists some (``{"id", "title"}``, first 3 kept), a list message when
    ``message.payload["list"]`` is ``{"button", "rows": [{"id", "title", "description"}]}`` (first 10 rows
    kept), else free text."""
    payload: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": message.recipient.strip().removeprefix("+"),
        "biz_opaque_callback_data": message.id,
    }
    buttons = (message.payload or {}).get("buttons") or []
    choices = (message.payload or {}).get("list") or {}
    if message.template:
        language = message.template.get("language") or DEFAULT_TEMPLATE_LANGUAGE
        template: dict[str, Any] = {
            "name": message.template["name"],
            "language": language if isinstance(language, dict) else {"code": language},
        }
        parameters = message.template.get("parameters") or []
        if parameters:
            template["components"] = [
                {"type": "body", "parameters": [{"type": "text", "text": str(p)} for p in parameters]}
            ]
        payload.update(type="template", template=template)
    elif buttons:
        reply_buttons = [
            {
                "type": "reply",
                "reply": {
                    "id": str(button["id"])[:BUTTON_ID_MAX],
                    "title": str(button["title"])[:BUTTON_TITLE_MAX],
                },
            }
            for button in buttons[:BUTTONS_MAX]
        ]
        payload.update(_interactive("button", message.body, {"buttons": reply_buttons}))
    elif choices.get("rows"):
        rows = [
            {
                "id": str(row["id"])[:LIST_ROW_ID_MAX],
                "title": str(row["title"])[:LIST_ROW_TITLE_MAX],
                **(
                    {"description": str(row["description"])[:LIST_ROW_DESCRIPTION_MAX]}
                    if row.get("description")
                    else {}
                ),
            }
            for row in choices["rows"][:LIST_ROWS_MAX]
        ]
        button = str(choices.get("button") or "Choisir")[:LIST_BUTTON_MAX]
        payload.update(_interactive("list", message.body, {"button": button, "sections": [{"rows": rows}]}))
    else:
        payload.update(type="text", text={"preview_url": False, "body": message.body[:TEXT_MAX]})
    return payload


def _interactive(kind: str, body: str, action: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "interactive",
        "interactive": {"type": kind, "body": {"text": body[:INTERACTIVE_BODY_MAX]}, "action": action},
    }


def _message_id(body: object) -> str | None:
    messages = body.get("messages") if isinstance(body, dict) else None
    first = messages[0] if isinstance(messages, list) and messages else None
    wamid = first.get("id") if isinstance(first, dict) else None
    return wamid if isinstance(wamid, str) and wamid else None
