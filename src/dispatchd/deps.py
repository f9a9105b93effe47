"""FastAPI dependencies shared by every router: the caller's principal and the app's services
(``app.state.services``, built by :mod:`dispatchd.assembly`)."""

from __future__ import annotations

import structlog
from cachetools import TTLCache
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dispatchd.core.auth import Principal, authenticate, hash_key
from dispatchd.core.db import Database
from dispatchd.core.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dk_…`")


class PrincipalCache:
    """Verified keys remembered for ``ttl_s`` seconds (a revoke in this process forgets at once)."""

    def __init__(self, ttl_s: float) -> None:
        self._entries: TTLCache[str, Principal] | None = (
            TTLCache(maxsize=10_000, ttl=ttl_s) if ttl_s > 0 else None
        )

    def get(self, key: str) -> Principal | None:
        return self._entries.get(hash_key(key)) if self._entries is not None else None

    def put(self, key: str, who: Principal) -> None:
        if self._entries is not None:
            self._entries[hash_key(key)] = who

    def forget(self, key_id: str) -> None:
        if self._entries is not None:
            for cached, who in list(self._entries.items()):
                if who.key_id == key_id:
                    self._entries.pop(cached, None)


async def principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    """The caller; raises :class:`Unauthorized` (401) without a valid, unrevoked key."""
    if credentials is None:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    services = request.app.state.services
    cache: PrincipalCache = services.principals
    who = cache.get(credentials.credentials)
    if who is None:
        async with services.db.read() as session:
            who = await authenticate(session, credentials.credentials)
        if who is None:
            raise Unauthorized("unknown or revoked API key")
        cache.put(credentials.credentials, who)
    structlog.contextvars.bind_contextvars(key_id=who.key_id, role=who.role.value)
    return who


async def database(request: Request) -> Database:
    return request.app.state.services.db


def domain_service(name: str):
    """A dependency returning the service of domain ``name`` (``Depends(domain_service("matching"))``)."""

    async def dependency(request: Request):
        return request.app.state.services.domain(name).service

    return dependency


def domain_extra(name: str, key: str):
    """A dependency returning ``extras[key]`` of domain ``name`` (a rate limiter, a cache…)."""

    async def dependency(request: Request):
        return request.app.state.services.domain(name).extras[key]

    return dependency
