"""What the HTTP provider channels share: one httpx client (kept alive for every send in flight, closed
only when the channel made it), a timeout, and the scrubbing of the secret from anything it reports."""

from __future__ import annotations

import httpx

RAW_MAX = 2000
REDACTED = "[REDACTED]"
# keep-alive for every connection in flight: with httpx's default (20), sends past 20 at once reconnect
LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=200)


class HttpChannel:
    def __init__(self, secret: str, *, http: httpx.AsyncClient | None, timeout_s: float) -> None:
        self._token = secret
        self._timeout_s = timeout_s
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout_s, limits=LIMITS)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _scrub(self, text: str) -> str:
        """``text`` without the secret (providers sometimes echo it in errors)."""
        return text.replace(self._token, REDACTED) if self._token else text
