"""What the HTTP provider channels share: one httpx client (kept alive for every send in flight, closed
only when the channel made it), a timeout, and the scrubbing of the secret from anything it reports.

HTTP/2 (``http2``, setting ``DISPATCHD_WHATSAPP_HTTP2``): ``"off"`` (the default) keeps HTTP/1.1 keep-alive;
``"alpn"`` offers HTTP/2 to TLS servers (HTTPS: Meta's Graph API), falling back to HTTP/1.1 when the
server does not take it; ``"prior_knowledge"`` speaks it over cleartext too (h2c, for a local server that
does). Measured with ``bench.notifications_http2`` (docs/benchmarks.md, issue 11): one HTTP/2 connection
multiplexing 32 sends costs the sender about a third of the CPU of 32 HTTP/1.1 keep-alive connections;
but when the server ends the connection (GOAWAY after N requests, as Hypercorn does after 1,000) httpx
fails the sends in flight on it (``WriteError``, ``RemoteProtocolError: ConnectionTerminated``: CONNECTION,
retried), a burst that can open the breaker and re-send messages the server had taken; retrying them at
once is not safe (httpx does not say which streams the server processed). Hence off by default."""

from __future__ import annotations

import httpx

RAW_MAX = 2000
REDACTED = "[REDACTED]"
# keep-alive for every connection in flight: with httpx's default (20), sends past 20 at once reconnect
LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=200)


HTTP2_MODES = ("off", "alpn", "prior_knowledge")


def client(timeout_s: float, http2: str = "off") -> httpx.AsyncClient:
    """An httpx client for one provider: ``timeout_s`` seconds per request, ``http2`` one of
    :data:`HTTP2_MODES` (raises ``ValueError`` otherwise; HTTP/2 needs the ``h2`` package)."""
    if http2 not in HTTP2_MODES:
        raise ValueError(f"http2 must be one of {HTTP2_MODES}")
    return httpx.AsyncClient(
        timeout=timeout_s, limits=LIMITS, http2=http2 != "off", http1=http2 != "prior_knowledge"
    )


class HttpChannel:
    def __init__(
        self, secret: str, *, http: httpx.AsyncClient | None, timeout_s: float, http2: str = "off"
    ) -> None:
        self._token = secret
        self._timeout_s = timeout_s
        self._owns_http = http is None
        self._http = http if http is not None else client(timeout_s, http2)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _scrub(self, text: str) -> str:
        """``text`` without the secret (providers sometimes echo it in errors)."""
        return text.replace(self._token, REDACTED) if self._token else text
