"""A Python client for dispatchd's event stream: ``GET /v1/stream`` (Server-Sent Events) and
``POST /v1/stream-tokens``.

:func:`stream` follows the event log live and survives lost connections: it reconnects with exponential
backoff and jitter, resuming with ``Last-Event-ID`` (the id of the last event it yielded), so that an
event is yielded once, in id order, however often the connection drops. Framing and reconnection
follow the WHATWG HTML Standard, §9.2 "Server-sent events" (``id:``, ``event:``, ``data:``, ``retry:``,
``Last-Event-ID``); error answers are RFC 9457 ``application/problem+json`` with a ``code``.

Example::

    from contextlib import aclosing
    from dispatchd.client import stream

    async with aclosing(stream("http://localhost:8000", key, ["booking:*"], after=0)) as events:
        async for event in events:
            print(event.id, event.topic, event.type, event.data)

Close the generator (``aclosing``, or ``break`` inside ``async with``) to close the connection at once;
an abandoned generator holds it until it is garbage-collected.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

__all__ = ["StreamError", "StreamEvent", "StreamLost", "StreamRefused", "stream", "stream_token"]

#: ``event: close`` codes and reasons after which reconnecting is pointless (the key cannot read on)
_FINAL_CLOSE_CODES = frozenset({"KEY_REVOKED", "FORBIDDEN", "UNAUTHORIZED"})
_FINAL_CLOSE_REASONS = frozenset({"revoked", "forbidden"})
#: answers worth retrying: timeout, too many requests/streams, and every 5xx
_RETRY_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class StreamEvent:
    """One event of the log, as the stream sends it.

    ``id`` is the log's strictly increasing id (resume after it); ``topic`` e.g. ``booking:bkg_…``;
    ``type`` e.g. ``OfferSent``; ``data`` the event's JSON object; ``created_at`` timezone-aware UTC.
    """

    id: int
    topic: str
    type: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_json(cls, text: str) -> StreamEvent:
        """Parse a frame's ``data:`` (``{"id", "topic", "type", "data", "created_at"}``).

        Raises :class:`StreamError` if it is not that object.
        """
        try:
            body = json.loads(text)
            created_at = datetime.fromisoformat(body["created_at"])
            data = body["data"]
            if not isinstance(data, dict) or isinstance(body["id"], bool):
                raise TypeError("data is not an object or id is not an integer")
            return cls(
                id=int(body["id"]),
                topic=str(body["topic"]),
                type=str(body["type"]),
                data=data,
                created_at=created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StreamError(f"malformed event {text[:200]!r}: {exc}") from exc


class StreamError(Exception):
    """The stream cannot go on: a malformed frame, or (subclasses) a refusal or too many lost
    connections."""


class StreamRefused(StreamError):
    """The server refused the stream for good: 401 UNAUTHORIZED, 403 FORBIDDEN, another 4xx (e.g. 422
    VALIDATION_ERROR for an invalid topic), or an ``event: close`` frame for a revoked key.

    ``status`` is the HTTP status (None for an ``event: close`` frame), ``code`` the problem+json
    ``code`` (RFC 9457; ``KEY_REVOKED`` from a close frame), ``detail`` its human text.
    """

    def __init__(self, status: int | None, code: str | None, detail: str = "") -> None:
        super().__init__(f"stream refused: {status or 'closed'} {code or ''}: {detail}".strip(": "))
        self.status = status
        self.code = code
        self.detail = detail


class StreamLost(StreamError):
    """``max_retries`` reconnections in a row failed or ended before an event; ``__cause__`` is the last
    error (None when the server closed the response cleanly)."""


async def stream_token(
    url: str, key: str, topics: Sequence[str] = (), *, client: httpx.AsyncClient | None = None
) -> str:
    """A stream token for ``topics`` from ``POST {url}/v1/stream-tokens`` (valid 60 s to connect).

    ``url`` is the server's base URL, ``key`` an API key that may read the topics. Raises
    :class:`StreamRefused` on 4xx (401 UNAUTHORIZED, 403 FORBIDDEN, 422 for an invalid topic),
    :class:`httpx.HTTPStatusError` on 5xx, :class:`httpx.TransportError` when unreachable.
    """
    endpoint = f"{url.rstrip('/')}/v1/stream-tokens"
    headers = {"Authorization": f"Bearer {key}"}
    async with _client(client) as http:
        response = await http.post(endpoint, json={"topics": list(topics)}, headers=headers)
    if 400 <= response.status_code < 500:
        raise _refusal(response)
    response.raise_for_status()
    return str(response.json()["token"])


async def stream(
    url: str,
    key: str,
    topics: Sequence[str] = (),
    after: int | None = None,
    *,
    token: str | None = None,
    max_retries: int | None = None,
    backoff_s: tuple[float, float] = (0.5, 30.0),
    read_timeout_s: float | None = 60.0,
    on_open: Callable[[], object] | None = None,
    client: httpx.AsyncClient | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> AsyncIterator[StreamEvent]:
    """Yield the events of ``topics`` from ``GET {url}/v1/stream``, in id order, each once, reconnecting
    as needed.

    - ``url``: the server's base URL; ``key``: an API key sent as ``Authorization: Bearer``. A staff key
      with no topic reads every topic; patterns such as ``booking:*`` are for staff keys.
    - ``after``: start after this event id (exclusive; 0 = the whole log); None = only events written
      from the connection on. Every reconnection sends ``Last-Event-ID`` = the last id yielded (or
      ``after``), so nothing is missed or repeated. With ``after=None`` a connection lost before the
      first event resumes live, missing what was written in between.
    - ``token``: a stream token (:func:`stream_token`) sent as ``?token=`` on the first connection
      instead of the key; reconnections use the key when one is given (a token is good for 60 s), else
      the token again.
    - ``max_retries``: reconnections in a row that may fail (or end before an event) before
      :class:`StreamLost` is raised; None = retry for ever. A connection that yields an event resets
      the count.
    - ``backoff_s``: ``(initial, cap)`` seconds. Before the n-th reconnection in a row the delay is
      d = min(cap, initial · 2ⁿ⁻¹), drawn uniformly in [d/2, d] (jitter); the server's ``retry:`` hint
      (milliseconds) replaces ``initial`` (and raises ``cap`` to it if lower), a 429's ``Retry-After``
      is a floor.
    - ``read_timeout_s``: seconds without a byte (events or ``: ping`` comments) after which the
      connection counts as lost; keep it above the server's ``DISPATCHD_STREAM_PING_S``.
    - ``on_open``: called each time a connection is accepted (200, ``text/event-stream``).
    - ``client``: an :class:`httpx.AsyncClient` to use (not closed here); else one is made and closed.
    - ``sleep``, ``rng``: injectable for tests (the backoff waits and the jitter).

    Raises :class:`StreamRefused` (401/403/other 4xx, or ``event: close`` for a revoked key: never
    retried), :class:`StreamLost` (``max_retries`` exhausted), :class:`StreamError` (a malformed frame).
    """
    endpoint = f"{url.rstrip('/')}/v1/stream"
    initial_s, cap_s = backoff_s
    jitter = rng or random.Random()
    position = after
    failures = 0  # consecutive connections that failed or ended without an event
    first = True
    async with _client(client) as http:
        while True:
            params: list[tuple[str, str]] = [("topic", topic) for topic in topics]
            headers: dict[str, str] = {}
            if token is not None and (first or not key):
                params.append(("token", token))
            else:
                headers["Authorization"] = f"Bearer {key}"
            if position is not None:
                headers["Last-Event-ID"] = str(position)
            first = False
            progressed = False
            floor_s = 0.0
            cause: BaseException | None = None
            timeout = httpx.Timeout(10.0, read=read_timeout_s)
            try:
                async with aconnect_sse(
                    http, "GET", endpoint, params=params, headers=headers, timeout=timeout
                ) as source:
                    response = source.response
                    if response.status_code != 200:
                        await response.aread()
                        if response.status_code >= 500 or response.status_code in _RETRY_STATUSES:
                            floor_s = _retry_after_s(response)
                            raise httpx.HTTPStatusError(
                                f"GET /v1/stream answered {response.status_code}",
                                request=response.request,
                                response=response,
                            )
                        raise _refusal(response)
                    if on_open is not None:
                        on_open()
                    async for frame in source.aiter_sse():
                        if frame.retry is not None:
                            initial_s = frame.retry / 1000
                        if frame.event == "close":
                            _raise_if_final(frame.data)
                            break
                        if not frame.data:
                            continue  # a retry: frame alone
                        event = StreamEvent.from_json(frame.data)
                        if position is not None and event.id <= position:
                            continue  # already yielded (a server replaying too much)
                        position = event.id
                        progressed = True
                        failures = 0
                        yield event
            except (httpx.TransportError, httpx.HTTPStatusError, SSEError) as exc:
                cause = exc
            if not progressed:
                failures += 1
            if max_retries is not None and failures > max_retries:
                raise StreamLost(f"{failures} connections to {endpoint} in a row failed") from cause
            delay_s = min(max(cap_s, initial_s), initial_s * 2 ** max(failures - 1, 0))
            await sleep(max(floor_s, jitter.uniform(delay_s / 2, delay_s)))


def _client(client: httpx.AsyncClient | None) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """``client`` as an async context manager that leaves it open, or a new client closed on exit."""
    return httpx.AsyncClient() if client is None else nullcontext(client)


def _refusal(response: httpx.Response) -> StreamRefused:
    """A 4xx answer as :class:`StreamRefused`, with its RFC 9457 ``code`` and ``detail``."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        return StreamRefused(response.status_code, None, response.text[:200])
    code = problem.get("code")
    return StreamRefused(response.status_code, str(code) if code else None, str(problem.get("detail") or ""))


def _raise_if_final(data: str) -> None:
    """Raise :class:`StreamRefused` for an ``event: close`` frame after which the key may not read on
    (``code`` KEY_REVOKED / FORBIDDEN, or reason ``revoked`` / ``forbidden``)."""
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code, reason = body.get("code"), body.get("reason")
    if code in _FINAL_CLOSE_CODES or reason in _FINAL_CLOSE_REASONS:
        raise StreamRefused(None, str(code or reason).upper(), str(reason or ""))


def _retry_after_s(response: httpx.Response) -> float:
    """``Retry-After`` in seconds (RFC 9110 §10.2.3, the delay-seconds form), else 0."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:
        return 0.0
