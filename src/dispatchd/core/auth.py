"""API keys, roles and principals.

Keys are ``dk_`` + 32 random bytes (URL-safe base64), shown once and stored only as SHA-256 hex: a key
has 256 bits of entropy, so a fast hash is the standard choice (as GitHub and Stripe tokens), and the
lookup is one indexed equality. Requests carry ``Authorization: Bearer <key>`` (RFC 6750).

Roles: ``admin`` (everything), ``integration`` (everything but key management), ``driver`` (acts only
as its own driver), ``agent`` (acts only as its own agent: presence, its conversations). A ``driver``
key is bound to a subject, ``driver:<id>``, an ``agent`` key to ``agent:<id>``: what it may read is
decided by :meth:`Principal.may_read` over the topic names of
:mod:`dispatchd.core.topics`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core import topics
from dispatchd.core.db import Base, savepoint
from dispatchd.core.errors import Forbidden, InvalidInput, NotFound
from dispatchd.core.ids import new_id
from dispatchd.core.types import UTCDateTime

KEY_PREFIX = "dk_"


class Role(StrEnum):
    ADMIN = "admin"
    INTEGRATION = "integration"
    DRIVER = "driver"
    AGENT = "agent"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    #: the topic the key acts as (``driver:drv_…``), for subject-bound roles only
    subject: Mapped[str | None] = mapped_column(String(80))
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def driver_id(self) -> str | None:
        return subject_id(self.subject, topics.DRIVER)


#: the subject kind each subject-bound role is bound to
SUBJECT_OF_ROLE = {Role.DRIVER: topics.DRIVER, Role.AGENT: topics.AGENT}


def subject_id(subject: str | None, kind: str) -> str | None:
    """``"driver:drv_1"``, ``"driver"`` → ``"drv_1"``; None for another kind or no subject."""
    if subject is None:
        return None
    subject_kind, _, row_id = subject.partition(":")
    return row_id if subject_kind == kind else None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, its role and, for a subject-bound role, its subject
    (``driver:drv_…``)."""

    key_id: str
    role: Role
    subject: str | None = None

    @property
    def is_staff(self) -> bool:
        return self.role in (Role.ADMIN, Role.INTEGRATION)

    @property
    def driver_id(self) -> str | None:
        return subject_id(self.subject, topics.DRIVER)

    @property
    def agent_id(self) -> str | None:
        return subject_id(self.subject, topics.AGENT)

    def require_agent(self, agent_id: str) -> None:
        """Raise :class:`Forbidden` unless staff or the agent ``agent_id`` itself."""
        if not self.is_staff and self.subject != topics.agent(agent_id):
            raise Forbidden("an agent key may act only as its own agent")

    def may_read(self, topic: str) -> bool:
        """Whether this principal may read events of ``topic`` (or, for staff, of a pattern such as
        ``booking:*``): staff read everything; a subject-bound key reads its own subject's topic only."""
        if self.is_staff:
            return topics.is_valid(topic, pattern=True)
        return self.subject is not None and topic == self.subject

    def readable(self, requested: list[str] | None) -> list[str]:
        """The topics to read for ``requested`` (None: everything this principal may read). Raises
        :class:`Forbidden` naming the first topic it may not read."""
        if not requested:
            if self.is_staff:
                return []
            if self.subject is None:
                raise Forbidden("this key may read no topic")
            return [self.subject]
        for topic in requested:
            if self.is_staff and not topics.is_valid(topic, pattern=True):
                raise InvalidInput(f"{topic!r} is neither a topic (kind:id) nor a pattern (kind:*)")
            if not self.may_read(topic):
                own = f"only topic {self.subject}" if self.subject else "no topic"
                raise Forbidden(f"this key may not read topic {topic!r}; it may read {own}")
        return requested

    def require_staff(self) -> None:
        """Raise :class:`Forbidden` unless admin or integration."""
        if not self.is_staff:
            raise Forbidden("this action needs an admin or integration key")

    def require_admin(self) -> None:
        if self.role is not Role.ADMIN:
            raise Forbidden("this action needs an admin key")

    def require_driver(self, driver_id: str) -> None:
        """Raise :class:`Forbidden` when a driver key acts for another driver."""
        if not self.is_staff and self.subject != topics.driver(driver_id):
            raise Forbidden("a driver key may act only as its own driver")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


#: Random bytes of a generated key (256 bits, OWASP ASVS V2: at least 128 bits for a secret).
KEY_BYTES = 32


def generate_key() -> str:
    """``dk_`` and 256 random bits in base64url (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def weaker_than_generated(key: str) -> bool:
    """True when ``key`` (without its ``dk_`` prefix) is shorter than a generated key's 43 characters or
    uses fewer than 16 distinct characters (``aaaa…``, ``0123…`` repeated): a configured admin key should
    be as hard to guess as a generated one."""
    body = key.removeprefix(KEY_PREFIX)
    return len(body) < len(secrets.token_urlsafe(KEY_BYTES)) or len(set(body)) < 16


async def create_key(
    session: AsyncSession,
    role: Role,
    *,
    driver_id: str | None = None,
    subject: str | None = None,
    name: str | None = None,
    key: str | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key (only its hash) and return ``(row, plaintext key)``. ``driver_id`` is short for
    ``subject="driver:<driver_id>"``.

    Raises :class:`InvalidInput` when a subject-bound role has no subject of its kind, or another role
    has one.
    """
    if driver_id is not None:
        if subject is not None and subject != topics.driver(driver_id):
            raise InvalidInput("give driver_id or subject, not two different ones")
        subject = topics.driver(driver_id)
    kind = SUBJECT_OF_ROLE.get(role)
    if kind is None and subject is not None:
        raise InvalidInput(f"role {role.value!r} is not bound to a subject")
    if kind is not None and (subject is None or not subject_id(subject, kind)):
        raise InvalidInput(f"role {role.value!r} needs a subject {kind}:<id> ({kind}_id)")
    plaintext = key or generate_key()
    row = ApiKey(
        id=new_id("key"),
        key_hash=hash_key(plaintext),
        role=role.value,
        subject=subject,
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
    return Principal(key_id=row.id, role=Role(row.role), subject=row.subject)


async def revoke_key(session: AsyncSession, key_id: str) -> ApiKey:
    """Mark a key revoked; raises :class:`NotFound`."""
    row = await session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"api key {key_id} not found", code="API_KEY_NOT_FOUND")
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
            try:
                async with savepoint(session):
                    await create_key(
                        session, Role.ADMIN, name="bootstrap (DISPATCHD_ADMIN_API_KEY)", key=configured_key
                    )
            except IntegrityError:
                pass  # another instance starting at the same moment stored it first
        return None
    active_admin = await session.scalar(
        select(ApiKey.id).where(ApiKey.role == Role.ADMIN.value, ApiKey.revoked_at.is_(None)).limit(1)
    )
    if active_admin is not None:
        return None
    _, plaintext = await create_key(session, Role.ADMIN, name="bootstrap (generated)")
    return plaintext
