"""A tiny fake WhatsApp Cloud API for the delivery crash test and the notification benchmark.

``POST /{version}/{phone_number_id}/messages`` answers like Meta's Cloud API: 200
``{"messaging_product": "whatsapp", "contacts": [...], "messages": [{"id": "wamid.<uuid>"}]}``, or, for a
``--fail-rate`` share of calls picked at random, 503 with a Graph API error body (code 131000, "Something
went wrong": TEMPORARY in :mod:`dispatchd.notifications.classify`). ``--latency-ms`` delays every answer.

A successful call is recorded *before* the latency: the message counts as delivered even when the caller
dies before reading the answer (the case that makes an at-least-once sender deliver twice). The
notification id is the request's ``biz_opaque_callback_data`` (what dispatchd sends), else ``id``.

Other routes:

- ``GET /stats``: ``{"delivered", "unique", "duplicates", "calls", "failed", "first_call_at",
  "last_new_at"}`` (times are ``time.time()``); ``?ids=1`` adds ``counts`` (id → deliveries) and
  ``attempts`` (id → calls, failed ones included); ``?times=1`` adds ``first_delivery_times`` (the
  time each id was first delivered, in order);
- ``POST /reset``: forget everything.

Usage: ``python -m bench.fake_whatsapp --port P [--fail-rate 0.2] [--latency-ms 5] [--seed S]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid

from aiohttp import web

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


class FakeWhatsApp:
    def __init__(self, fail_rate: float = 0.0, latency_s: float = 0.0, seed: int | None = None) -> None:
        self.fail_rate = fail_rate
        self.latency_s = latency_s
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.rng = random.Random(self.seed)  # every run sees the same sequence of failures
        self.counts: dict[str, int] = {}
        self.attempts: dict[str, int] = {}
        self.first_times: list[float] = []
        self.calls = 0
        self.failed = 0
        self.first_call_at: float | None = None

    async def messages(self, request: web.Request) -> web.Response:
        now = time.time()
        self.calls += 1
        if self.first_call_at is None:
            self.first_call_at = now
        try:
            body = await request.json()
        except ValueError:
            body = {}
        notification_id = str(body.get("biz_opaque_callback_data") or body.get("id") or "")
        self.attempts[notification_id] = self.attempts.get(notification_id, 0) + 1
        if self.rng.random() < self.fail_rate:
            self.failed += 1
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            return web.Response(status=503, text=ERROR_BODY, content_type="application/json")
        seen = self.counts.get(notification_id, 0)
        self.counts[notification_id] = seen + 1
        if not seen:
            self.first_times.append(now)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        to = str(body.get("to", ""))
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to}],
                "messages": [{"id": f"wamid.{uuid.uuid4().hex}"}],
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        delivered = sum(self.counts.values())
        answer: dict[str, object] = {
            "delivered": delivered,
            "unique": len(self.counts),
            "duplicates": delivered - len(self.counts),
            "calls": self.calls,
            "failed": self.failed,
            "first_call_at": self.first_call_at,
            "last_new_at": self.first_times[-1] if self.first_times else None,
        }
        if request.query.get("ids"):
            answer["counts"] = self.counts
            answer["attempts"] = self.attempts
        if request.query.get("times"):
            answer["first_delivery_times"] = self.first_times
        return web.json_response(answer)

    async def reset_route(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**2)
        app.router.add_post("/{version}/{phone_number_id}/messages", self.messages)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/reset", self.reset_route)
        return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-rate", type=float, default=0.0, help="share of calls answered 503 (0..1)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--seed", type=int, default=None, help="seed of the failure draw")
    args = parser.parse_args()
    fake = FakeWhatsApp(args.fail_rate, args.latency_ms / 1000, args.seed)
    web.run_app(fake.app(), host=args.host, port=args.port, access_log=None, print=None, backlog=1024)


if __name__ == "__main__":
    main()
