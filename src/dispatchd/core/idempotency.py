"""``Idempotency-Key`` support (IETF draft-ietf-httpapi-idempotency-key-header): the first outcome of a
request is stored, in the same transaction as its effect, and returned again for a retry.

A key is scoped by the API key that sent it. Reusing a key with a different request body is an error
(422 ``IDEMPOTENCY_KEY_REUSED``), as Stripe does.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from dispatchd.core.db import Base
from dispatchd.core.errors import InvalidInput
from dispatchd.core.types import UTCDateTime


class IdempotentRequest(Base):
    __tablename__ = "idempotent_requests"

    scope: Mapped[str] = mapped_column(String(300), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


def fingerprint(payload: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``payload``."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


async def recall(session: AsyncSession, scope: str, request_fingerprint: str) -> IdempotentRequest | None:
    """The stored outcome for ``scope``, or None. Raises :class:`InvalidInput` (IDEMPOTENCY_KEY_REUSED)
    when the key was used for a different request."""
    row = await session.get(IdempotentRequest, scope)
    if row is not None and row.fingerprint != request_fingerprint:
        raise InvalidInput(
            "this Idempotency-Key was used for a different request", code="IDEMPOTENCY_KEY_REUSED"
        )
    return row


async def recall_many(session: AsyncSession, scopes: list[str]) -> dict[str, IdempotentRequest]:
    """The stored outcomes of ``scopes`` in one read, by scope (the caller compares fingerprints)."""
    if not scopes:
        return {}
    rows = await session.scalars(select(IdempotentRequest).where(IdempotentRequest.scope.in_(set(scopes))))
    return {row.scope: row for row in rows}


def remember(
    session: AsyncSession, scope: str, request_fingerprint: str, status_code: int, outcome: dict[str, Any]
) -> None:
    """Store the outcome in the current unit of work (a concurrent duplicate fails on the primary key)."""
    session.add(
        IdempotentRequest(
            scope=scope,
            fingerprint=request_fingerprint,
            status_code=status_code,
            outcome=outcome,
            created_at=session.info["now"],
        )
    )
