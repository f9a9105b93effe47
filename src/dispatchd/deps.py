"""FastAPI dependencies shared by every router: the caller's principal and the app's services."""

from __future__ import annotations

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dispatchd.core.auth import Principal, authenticate
from dispatchd.core.db import Database
from dispatchd.core.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dk_…`")


async def principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    """The caller; raises :class:`Unauthorized` (401) without a valid, unrevoked key."""
    if credentials is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    db: Database = request.app.state.db
    async with db.read() as session:
        who = await authenticate(session, credentials.credentials)
    if who is None:
        raise Unauthorized("unknown or revoked API key")
    structlog.contextvars.bind_contextvars(key_id=who.key_id, role=who.role.value)
    return who


def database(request: Request) -> Database:
    return request.app.state.db
