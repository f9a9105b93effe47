"""Stream tokens: what a browser passes as ``?token=`` (SSE) or in its first WebSocket message, since
``EventSource`` cannot send an ``Authorization`` header (WHATWG HTML §9.2).

``POST /v1/stream-tokens`` turns the caller's API key into a short-lived token bound to the key and to
the topics it asked for (each checked by :meth:`Principal.may_read`). A token is signed with
itsdangerous (HMAC-SHA256 over a URL-safe JSON payload and a timestamp) and is accepted for
``DISPATCHD_STREAM_TOKEN_TTL_S`` (60 s) *to connect*: an open stream outlives it, and is closed when
its key is revoked (:meth:`dispatchd.realtime.hub.Hub.close_revoked`). The key itself never reaches the
browser's storage or a URL.

The secret is ``DISPATCHD_STREAM_TOKEN_SECRET``, or else a random one created once in the database
(table ``server_secrets``), so that a token issued by one instance is accepted by the others.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.auth import Principal, Role
from dispatchd.core.db import Base, Database
from dispatchd.core.errors import Unauthorized
from dispatchd.core.types import UTCDateTime
from dispatchd.realtime import metrics

SECRET_NAME = "stream_token"
_SALT = "dispatchd.stream-token.v1"


class ServerSecret(Base):
    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token says: who (the key's principal) and the topics it may stream."""

    principal: Principal
    topics: list[str]


class StreamTokens:
    """Issues and verifies stream tokens (see the module doc)."""

    def __init__(self, db: Database, *, ttl_s: float, secret: str | None = None) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._secret = secret
        self._serializer: URLSafeTimedSerializer | None = None

    async def _signer(self) -> URLSafeTimedSerializer:
        if self._serializer is None:
            secret = self._secret or await self._stored_secret()
            clock = self.db.clock

            class ClockSigner(TimestampSigner):
                def get_timestamp(self) -> int:  # the server's clock, injectable in tests
                    return int(clock.now().timestamp())

            self._serializer = URLSafeTimedSerializer(secret, salt=_SALT, signer=ClockSigner)
        return self._serializer

    async def _stored_secret(self) -> str:
        async with self.db.read() as session:
            value = await session.scalar(select(ServerSecret.value).where(ServerSecret.name == SECRET_NAME))
        if value is not None:
            return value
        try:
            async with self.db.transaction() as session:
                session.add(
                    ServerSecret(
                        name=SECRET_NAME, value=secrets.token_urlsafe(48), created_at=session.info["now"]
                    )
                )
        except Exception:  # another instance stored it first: read theirs
            pass
        async with self.db.read() as session:
            return await session.scalar(select(ServerSecret.value).where(ServerSecret.name == SECRET_NAME))

    async def issue(self, principal: Principal, topics: list[str]) -> tuple[str, datetime]:
        """A token for ``principal`` and ``topics`` (already checked by ``Principal.readable``; ``[]``
        for staff = everything), and when it stops being accepted (UTC)."""
        signer = await self._signer()
        token = signer.dumps(
            {"k": principal.key_id, "r": principal.role.value, "s": principal.subject, "t": topics}
        )
        metrics.TOKENS_ISSUED.inc()
        return token, self.db.clock.now() + timedelta(seconds=self.ttl_s)

    async def verify(self, token: str) -> TokenClaims:
        """The claims of ``token``; raises :class:`Unauthorized` (code ``STREAM_TOKEN_INVALID`` or
        ``STREAM_TOKEN_EXPIRED``) when it is forged, altered, malformed or older than the TTL."""
        signer = await self._signer()
        if len(token) > 4096:
            metrics.TOKENS_REFUSED.labels("malformed").inc()
            raise Unauthorized("this stream token is not valid", code="STREAM_TOKEN_INVALID")
        try:
            claims = signer.loads(token, max_age=self.ttl_s)
        except SignatureExpired as exc:
            metrics.TOKENS_REFUSED.labels("expired").inc()
            raise Unauthorized(
                f"this stream token is older than {self.ttl_s:g} s; ask POST /v1/stream-tokens for a new one",
                code="STREAM_TOKEN_EXPIRED",
            ) from exc
        except BadSignature as exc:
            metrics.TOKENS_REFUSED.labels("invalid").inc()
            raise Unauthorized("this stream token is not valid", code="STREAM_TOKEN_INVALID") from exc
        try:
            principal = Principal(key_id=str(claims["k"]), role=Role(claims["r"]), subject=claims["s"])
            topics = [str(name) for name in claims["t"]]
        except (KeyError, TypeError, ValueError) as exc:
            metrics.TOKENS_REFUSED.labels("invalid").inc()
            raise Unauthorized("this stream token is not valid", code="STREAM_TOKEN_INVALID") from exc
        return TokenClaims(principal, topics)
