"""API keys, roles and principals.

Keys are ``dk_`` + 32 random bytes (URL-safe base64), shown once and stored only as SHA-256 hex: a key
has 256 bits of entropy, so a fast hash is the standard choice (as GitHub and Stripe tokens), and the
lookup is one indexed equality. Requests carry ``Authorization: Bearer <key>`` (RFC 6750).

Roles: ``admin`` (everything), ``integration`` (everything but key management), ``driver`` (acts only
as its own driver).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.db import Base
from dispatchd.core.errors import Forbidden, InvalidInput, NotFound
from dispatchd.core.ids import new_id
from dispatchd.core.types import UTCDateTime

KEY_PREFIX = "dk_"


class Role(StrEnum):
    ADMIN = "admin"
    INTEGRATION = "integration"
    DRIVER = "driver"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    driver_id: Mapped[str | None] = mapped_column(String(40))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its role and, for role ``driver``, its driver id."""

    key_id: str
    role: Role
    driver_id: str | None = None

    @property
    def is_staff(self) -> bool:
        return self.role in (Role.ADMIN, Role.INTEGRATION)

    def require_staff(self) -> None:
        """Raise :class:`Forbidden` unless admin or integration."""
        if not self.is_staff:
            raise Forbidden("this action needs an admin or integration key")

    def require_admin(self) -> None:
        if self.role is not Role.ADMIN:
            raise Forbidden("this action needs an admin key")

    def require_driver(self, driver_id: str) -> None:
        """Raise :class:`Forbidden` when a driver key acts for another driver."""
        if not self.is_staff and self.driver_id != driver_id:
            raise Forbidden("a driver key may act only as its own driver")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def create_key(
    session: AsyncSession,
    role: Role,
    *,
    driver_id: str | None = None,
    name: str | None = None,
    key: str | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key (only its hash) and return ``(row, plaintext key)``.

    Raises :class:`InvalidInput` when a driver key has no ``driver_id`` (or another role has one).
    """
    if (role is Role.DRIVER) != (driver_id is not None):
        raise InvalidInput("role 'driver' needs a driver_id, and only it may have one")
    plaintext = key or generate_key()
    row = ApiKey(
        id=new_id("key"),
        key_hash=hash_key(plaintext),
        role=role.value,
        driver_id=driver_id,
        name=name,
        created_at=session.info["now"],
    )
    session.add(row)
    await session.flush()
    return row, plaintext


async def authenticate(session: AsyncSession, key: str) -> Principal | None:
    """The principal of an active key, or None."""
    row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, role=Role(row.role), driver_id=row.driver_id)


async def revoke_key(session: AsyncSession, key_id: str) -> ApiKey:
    """Mark a key revoked; raises :class:`NotFound`."""
    row = await session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"api key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = session.info["now"]
    return row


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list((await session.scalars(select(ApiKey).order_by(ApiKey.created_at))).all())


async def ensure_admin_key(session: AsyncSession, configured_key: str | None) -> str | None:
    """Make sure an admin can log in; return a newly generated key to print once, else None.

    With ``DISPATCHD_ADMIN_API_KEY`` set, its hash is stored (idempotent). Unset and no active admin key
    in the database: one is generated.
    """
    if configured_key:
        exists = await session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(configured_key)))
        if exists is None:
            await create_key(
                session, Role.ADMIN, name="bootstrap (DISPATCHD_ADMIN_API_KEY)", key=configured_key
            )
        return None
    active_admin = await session.scalar(
        select(ApiKey.id).where(ApiKey.role == Role.ADMIN.value, ApiKey.revoked_at.is_(None)).limit(1)
    )
    if active_admin is not None:
        return None
    _, plaintext = await create_key(session, Role.ADMIN, name="bootstrap (generated)")
    return plaintext
