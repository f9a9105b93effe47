"""A fake WhatsApp Cloud API (Starlette + uvicorn) for tests, benchmarks and ``dispatchd replay``'s
WhatsApp fleet.

``POST /{version}/{phone_number_id}/messages`` answers like Meta's Cloud API: 200
``{"messaging_product": "whatsapp", "contacts": [...], "messages": [{"id": "wamid.<hex>"}]}``, or:

- for a ``fail_rate`` share of calls picked at random: 503 with a Graph API error body (code 131000,
  "Something went wrong": TEMPORARY in :mod:`dispatchd.notifications.classify`);
- when ``pair_interval_s`` > 0 and the same ``to`` had a message accepted less than ``pair_interval_s``
  seconds before: 400 with Meta's pair rate limit error (code 131056, "(#131056) (Business Account,
  Consumer Account) pair rate limit hit"), counted in ``/stats`` as ``pair_limit_hits``. The pair check
  comes first; a refused call draws no failure and does not restart the interval.

``latency_s`` delays every answer. A successful call is recorded *before* the latency: the message counts
as delivered even when the caller dies before reading the answer (the case that makes an at-least-once
sender deliver twice). The notification id is the request's ``biz_opaque_callback_data`` (what dispatchd
sends), else ``id``. A body that is not a JSON object is accepted as ``{}`` (notification id ``""``).

Other routes:

- ``GET /messages?after=<seq>&limit=<n>`` (``after`` ≥ 0, default 0; ``limit`` 1–1000, default 100): the
  accepted messages with ``seq > after``, oldest first, as ``{"messages": [...], "next_after": seq}``.
  Each message is the request JSON as Meta received it (``to``, ``type``, ``text`` | ``interactive`` |
  ``template``, ``biz_opaque_callback_data``, …) plus ``seq`` (1, 2, … in acceptance order), ``at``
  (receive time, unix seconds), ``wamid`` (the id answered) and ``phone_number_id`` (from the path).
  ``next_after`` is the last ``seq`` returned, or ``after`` when there is none. Bad parameters: 400
  ``{"error": "..."}``.
- ``GET /stats``: ``{"delivered", "unique", "duplicates", "calls", "failed", "pair_limit_hits",
  "recorded", "first_call_at", "last_new_at"}`` (``recorded`` is the last ``seq``; times are unix
  seconds); ``?ids=1`` adds ``counts`` (id → deliveries) and ``attempts`` (id → calls, refused ones
  included); ``?times=1`` adds ``first_delivery_times`` (the time each id was first delivered, in order).
- ``POST /reset``: forget everything (counters, recorded messages, pair-limit state).

Run it: ``dispatchd fake-whatsapp --port P [--fail-rate 0.2] [--latency-ms 5] [--seed S]
[--pair-interval-s 6]`` or ``python -m dispatchd.testing.fake_whatsapp`` with the same options. In a
test: ``async with serving(FakeWhatsApp(...)) as url:``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

MAX_BODY_BYTES = 1024**2
MESSAGES_PAGE_MAX = 1000
MESSAGES_PAGE_DEFAULT = 100

#: Meta code 131000, answered with HTTP 503 to the ``fail_rate`` share of calls.
ERROR_BODY = json.dumps(
    {
        "error": {
            "message": "(#131000) Something went wrong",
            "type": "OAuthException",
            "code": 131000,
            "error_data": {"messaging_product": "whatsapp", "details": "Something went wrong"},
            "fbtrace_id": "AbCdEfGhIjK",
        }
    }
)

PAIR_LIMIT_CODE = 131056
#: Meta code 131056, answered with HTTP 400 to a message that comes too soon after the last one to a user.
PAIR_LIMIT_BODY = json.dumps(
    {
        "error": {
            "message": "(#131056) (Business Account, Consumer Account) pair rate limit hit",
            "type": "OAuthException",
            "code": PAIR_LIMIT_CODE,
            "error_data": {
                "messaging_product": "whatsapp",
                "details": "Message failed to send because there were too many messages sent from this "
                "phone number to the same phone number in a short period of time.",
            },
            "fbtrace_id": "AbCdEfGhIjL",
        }
    }
)


def _recipient_key(to: Any) -> str:
    """The pair-limit key of a ``to`` (Meta accepts it with or without ``+``)."""
    return str(to or "").strip().removeprefix("+")


class FakeWhatsApp:
    """The fake's state and routes. ``fail_rate`` in [0, 1]; ``latency_s`` and ``pair_interval_s`` in
    seconds (0 = off); ``seed`` makes the failure draw repeatable. ``monotonic`` (pair-limit intervals)
    and ``wall`` (``at`` and ``/stats`` times, unix seconds) are injectable clocks for tests."""

    def __init__(
        self,
        fail_rate: float = 0.0,
        latency_s: float = 0.0,
        seed: int | None = None,
        pair_interval_s: float = 0.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate must be within [0, 1]")
        if latency_s < 0 or pair_interval_s < 0:
            raise ValueError("latency_s and pair_interval_s must be >= 0")
        self.fail_rate = fail_rate
        self.latency_s = latency_s
        self.seed = seed
        self.pair_interval_s = pair_interval_s
        self.monotonic = monotonic
        self.wall = wall
        self.reset()

    def reset(self) -> None:
        self.rng = random.Random(self.seed)  # every run sees the same sequence of failures
        self.counts: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.first_times: list[float] = []
        self.calls = 0
        self.failed = 0
        self.pair_limit_hits = 0
        self.first_call_at: float | None = None
        self.recorded: list[dict[str, Any]] = []
        self.last_accepted: dict[str, float] = {}  # recipient → monotonic time of its last accepted message

    # -- routes -------------------------------------------------------------------------------------------

    async def send(self, request: Request) -> Response:
        now = self.wall()
        self.calls += 1
        if self.first_call_at is None:
            self.first_call_at = now
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        notification_id = str(body.get("biz_opaque_callback_data") or body.get("id") or "")
        self.attempts[notification_id] = self.attempts.get(notification_id, 0) + 1
        to = str(body.get("to", ""))
        key = _recipient_key(to)
        if self.pair_interval_s:
            last = self.last_accepted.get(key)
            if last is not None and self.monotonic() - last < self.pair_interval_s:
                self.pair_limit_hits += 1
                return await self._error(400, PAIR_LIMIT_BODY)
        if self.rng.random() < self.fail_rate:
            self.failed += 1
            return await self._error(503, ERROR_BODY)
        self.last_accepted[key] = self.monotonic()
        seen = self.counts.get(notification_id, 0)
        self.counts[notification_id] = seen + 1
        if not seen:
            self.first_times.append(now)
        wamid = f"wamid.{uuid.uuid4().hex}"
        self.recorded.append(
            {
                **body,
                "seq": len(self.recorded) + 1,
                "at": now,
                "wamid": wamid,
                "phone_number_id": request.path_params.get("phone_number_id"),
            }
        )
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return JSONResponse(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": key}],
                "messages": [{"id": wamid}],
            }
        )

    async def _error(self, status: int, body: str) -> Response:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return Response(body, status_code=status, media_type="application/json")

    async def messages(self, request: Request) -> Response:
        try:
            after = int(request.query_params.get("after", "0"))
            limit = int(request.query_params.get("limit", str(MESSAGES_PAGE_DEFAULT)))
        except ValueError:
            return JSONResponse({"error": "after and limit must be integers"}, status_code=400)
        if after < 0 or not 1 <= limit <= MESSAGES_PAGE_MAX:
            return JSONResponse(
                {"error": f"after must be >= 0 and limit within [1, {MESSAGES_PAGE_MAX}]"}, status_code=400
            )
        page = self.recorded[after : after + limit]
        return JSONResponse({"messages": page, "next_after": page[-1]["seq"] if page else after})

    async def stats(self, request: Request) -> Response:
        delivered = sum(self.counts.values())
        answer: dict[str, object] = {
            "delivered": delivered,
            "unique": len(self.counts),
            "duplicates": delivered - len(self.counts),
            "calls": self.calls,
            "failed": self.failed,
            "pair_limit_hits": self.pair_limit_hits,
            "recorded": len(self.recorded),
            "first_call_at": self.first_call_at,
            "last_new_at": self.first_times[-1] if self.first_times else None,
        }
        if request.query_params.get("ids"):
            answer["counts"] = self.counts
            answer["attempts"] = self.attempts
        if request.query_params.get("times"):
            answer["first_delivery_times"] = self.first_times
        return JSONResponse(answer)

    async def reset_route(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"reset": True})

    def app(self) -> Starlette:
        """The ASGI application serving this fake's routes."""
        return Starlette(
            routes=[
                Route(
                    "/{version}/{phone_number_id}/messages",
                    self.send,
                    methods=["POST"],
                    max_body_size=MAX_BODY_BYTES,
                ),
                Route("/messages", self.messages, methods=["GET"]),
                Route("/stats", self.stats, methods=["GET"]),
                Route("/reset", self.reset_route, methods=["POST"]),
            ]
        )


@contextlib.asynccontextmanager
async def serving(fake: FakeWhatsApp, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``fake`` with uvicorn on the running loop; yield its base URL (``http://host:port``; port 0
    picks a free one). Stops the server on exit. Raises ``RuntimeError`` when it does not start in 5 s."""
    config = uvicorn.Config(
        fake.app(), host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(250):
            if server.started or task.done():
                break
            await asyncio.sleep(0.02)
        if not server.started:
            raise RuntimeError("the fake WhatsApp server did not start")
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


def serve(
    port: int,
    host: str = "127.0.0.1",
    *,
    fail_rate: float = 0.0,
    latency_ms: float = 0.0,
    seed: int | None = None,
    pair_interval_s: float = 0.0,
) -> None:
    """Run the fake in the foreground until interrupted (``latency_ms`` in milliseconds)."""
    fake = FakeWhatsApp(fail_rate, latency_ms / 1000, seed, pair_interval_s)
    uvicorn.run(fake.app(), host=host, port=port, log_config=None, access_log=False, backlog=1024)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of calls answered 503 (0..1)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--seed", type=int, default=None, help="seed of the failure draw")
    parser.add_argument(
        "--pair-interval-s",
        type=float,
        default=0.0,
        help="refuse (400, Meta 131056) a message to a user served less than this many seconds ago; 0 = off",
    )
    args = parser.parse_args(argv)
    serve(
        args.port,
        args.host,
        fail_rate=args.fail_rate,
        latency_ms=args.latency_ms,
        seed=args.seed,
        pair_interval_s=args.pair_interval_s,
    )


if __name__ == "__main__":
    main()
