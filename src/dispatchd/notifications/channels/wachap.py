"""The ``wachap`` channel: the WaChap gateway (unofficial WhatsApp API, one HTTP POST per message).

Request: ``POST {api_url}`` with JSON ``{"number": "<E.164 without +>", "type": "text", "message": body,
"instance_id": ..., "access_token": ...}``. WaChap answers HTTP 200 for failures too, with
``{"status": "error", "message": "..."}``: such an answer is a failure, classified by
:func:`dispatchd.notifications.classify.classify_wachap`. The access token travels in the request body
and is removed from every error text.
"""

from __future__ import annotations

from typing import Any

import httpx

from dispatchd.notifications.channels.base import ChannelError, OutboundMessage, SendResult
from dispatchd.notifications.channels.http import RAW_MAX, HttpChannel
from dispatchd.notifications.classify import classify_transport, classify_wachap, wachap_error_message

#: ``status`` values of a failed answer (compared lower-cased; ``false`` also as a JSON boolean).
ERROR_STATUSES = frozenset({"error", "failed", "fail", "false"})


class WaChapChannel(HttpChannel):
    """Sends one text message per call. When ``http`` is given the caller owns it (``aclose`` leaves it
    open); ``timeout_s`` bounds each request, in seconds."""

    name = "wachap"

    def __init__(
        self,
        api_url: str,
        access_token: str,
        instance_id: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._url = api_url
        self._instance_id = instance_id
        super().__init__(access_token, http=http, timeout_s=timeout_s)

    def __repr__(self) -> str:
        return f"WaChapChannel(url={self._url!r}, instance_id={self._instance_id!r})"

    async def send(self, message: OutboundMessage) -> SendResult:
        """POST the message; return the provider id when the answer carries one, or raise
        :class:`ChannelError` (classified). A 2xx JSON object whose ``status`` is not an error value is a
        success (even without an id); a 2xx that is not a JSON object is a failure (UNKNOWN)."""
        request = {
            "number": message.recipient.strip().removeprefix("+"),
            "type": "text",
            "message": message.body,
            "instance_id": self._instance_id,
            "access_token": self._token,
        }
        try:
            response = await self._http.post(self._url, json=request, timeout=self._timeout_s)
        except httpx.HTTPError as exc:
            raise ChannelError(
                self._scrub(f"WaChap request failed: {type(exc).__name__}: {exc}"),
                classify_transport(exc),
            ) from None
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        if response.is_success and isinstance(body, dict) and not _is_error_status(body.get("status")):
            return SendResult(provider_message_id=_provider_id(body))
        if response.is_success:
            detail = f"WaChap error: {wachap_error_message(body) or 'unreadable answer'}"
        else:
            detail = (
                f"WaChap HTTP {response.status_code}: {wachap_error_message(body) or response.reason_phrase}"
            )
        raise ChannelError(
            self._scrub(detail)[:RAW_MAX],
            classify_wachap(response.status_code, body, response.headers),
            raw=self._scrub(response.text)[:RAW_MAX],
        )


def _is_error_status(status: object) -> bool:
    if status is False:
        return True
    return isinstance(status, str) and status.strip().lower() in ERROR_STATUSES


def _provider_id(body: dict[str, Any]) -> str | None:
    """``id``, ``message_id`` or ``data.key.id`` (also ``data.id`` / ``data.message_id``), else None."""
    data = body.get("data")
    key = data.get("key") if isinstance(data, dict) else None
    candidates = [body.get("id"), body.get("message_id")]
    if isinstance(data, dict):
        candidates += [
            key.get("id") if isinstance(key, dict) else None,
            data.get("id"),
            data.get("message_id"),
        ]
    for candidate in candidates:
        if isinstance(candidate, str | int) and not isinstance(candidate, bool) and str(candidate):
            return str(candidate)
    return None
