"""Console sign-in: an API key exchanged for a server-side session (OWASP Session Management Cheat Sheet).

* The key is read once, from the sign-in form, and never stored in the browser: the browser holds only
  a random session id (256 bits) in a cookie that is ``HttpOnly``, ``SameSite=Strict``, limited to
  ``/console`` and ``Secure`` when the console is reached over https. The database keeps the id's
  SHA-256, the key it stands for, and when it ends (``DISPATCHD_CONSOLE_SESSION_TTL_S``, 12 h).
* Every form and every htmx request carries the session's CSRF token (a synchronizer token, OWASP CSRF
  Prevention Cheat Sheet), checked in constant time. The sign-in form itself is protected by a
  double-submit token (a cookie and a hidden field that must match).
* A session ends at sign-out, at its expiry, or when its key is revoked (the key is re-checked at every
  request). Driver keys may not open the console.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, Index, String, delete, select
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.auth import ApiKey, Principal, Role
from dispatchd.core.db import Base, Database
from dispatchd.core.types import UTCDateTime

COOKIE = "dispatchd_console"
SIGN_IN_COOKIE = "dispatchd_console_sign_in"
#: roles that may open the console
CONSOLE_ROLES = (Role.ADMIN, Role.INTEGRATION, Role.AGENT)


class ConsoleSession(Base):
    __tablename__ = "console_sessions"

    #: SHA-256 (hex) of the cookie's value
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_console_sessions_expires_at", "expires_at"),)


@dataclass(frozen=True)
class SignedIn:
    """A live session: who, and the CSRF token its forms must carry."""

    principal: Principal
    csrf_token: str
    expires_at: datetime


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (False when either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Sessions:
    def __init__(self, db: Database, *, ttl_s: float) -> None:
        self.db = db
        self.ttl_s = ttl_s

    async def open(self, principal: Principal) -> tuple[str, SignedIn]:
        """A new session for ``principal``: ``(cookie value, session)``."""
        token = new_token()
        async with self.db.transaction() as session:
            now = session.info["now"]
            row = ConsoleSession(
                id=_digest(token),
                key_id=principal.key_id,
                csrf_token=new_token(),
                created_at=now,
                expires_at=now + timedelta(seconds=self.ttl_s),
            )
            session.add(row)
            # expired sessions go when someone signs in: the table stays small without a sweeper
            await session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
        return token, SignedIn(principal, row.csrf_token, row.expires_at)

    async def find(self, token: str | None) -> SignedIn | None:
        """The live session of a cookie value: not expired, its key not revoked; else None."""
        if not token or len(token) > 100:
            return None
        async with self.db.read() as session:
            found = (
                await session.execute(
                    select(ConsoleSession, ApiKey)
                    .join(ApiKey, ApiKey.id == ConsoleSession.key_id)
                    .where(ConsoleSession.id == _digest(token))
                )
            ).first()
            now = session.info["now"]
        if found is None:
            return None
        row, key = found
        if row.expires_at <= now or key.revoked_at is not None:
            return None
        principal = Principal(key_id=key.id, role=Role(key.role), subject=key.subject)
        return SignedIn(principal, row.csrf_token, row.expires_at)

    async def close(self, token: str | None) -> None:
        if not token:
            return
        async with self.db.transaction() as session:
            await session.execute(delete(ConsoleSession).where(ConsoleSession.id == _digest(token)))
