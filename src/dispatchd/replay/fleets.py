"""The simulated drivers of both fleets: the event-log fleet (offers from ``OfferSent``, answers through
``POST /v1/bookings/{id}/responses``) and the WhatsApp fleet (offers read from the fake's ``GET /messages``,
answers as signed webhooks), and the trips they drive once assigned.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from datetime import datetime
from typing import Any

from dispatchd.client import StreamError, StreamEvent, StreamRefused, stream
from dispatchd.core.geo import haversine_km
from dispatchd.replay.base import FINAL_STATUSES, _Answer, _Driver, _parse_utc, _ReplayBase
from dispatchd.replay.summary import lost_to_server_lag
from dispatchd.replay.trace import response_latency_trace_s, trip_duration_trace_s
from dispatchd.replay.whatsapp import (
    SIGNATURE_HEADER,
    WEBHOOK_PATH,
    WhatsAppOffer,
    choose_reply,
    offers_in_message,
    sign_webhook,
    webhook_reply_payload,
)

_WHATSAPP_POLL_S = 0.2
_WHATSAPP_PAGE = 500


def _as_dict(event: StreamEvent) -> dict[str, Any]:
    """An event as ``GET /v1/events`` answers it, which :meth:`_Fleets._on_event` reads."""
    return {
        "id": event.id,
        "topic": event.topic,
        "type": event.type,
        "data": event.data,
        "created_at": event.created_at.isoformat(),
    }


class _Fleets(_ReplayBase):
    """The drivers' side of a replay: the event log, the simulated drivers and the WhatsApp fleet."""

    # -- event log ----------------------------------------------------------------------------------------

    async def _poll_events(self) -> None:
        """Follow the event log live over ``GET /v1/stream`` (every topic: the replay's staff key), from
        its head at the start (the events before it are other runs'); ``events_caught_up`` is set once
        the stream is open, which is then the present. The client resumes lost connections with
        ``Last-Event-ID``, so every event reaches :meth:`_on_event` once, in id order."""
        head = await self._event_log_head()
        while head is None and not self.stopping.is_set():
            await asyncio.sleep(1.0)
            head = await self._event_log_head()
        position = head
        while not self.stopping.is_set():
            try:
                events = stream(
                    self.options.url,
                    self.options.api_key,
                    after=position,
                    client=self.events_client,
                    on_open=self.events_caught_up.set,
                )
                async with aclosing(events):
                    async for event in events:
                        position = event.id
                        try:
                            self._on_event(_as_dict(event))
                        except (KeyError, TypeError, ValueError) as exc:
                            self._record_error("malformed event", "GET /v1/stream", f"{event!r}: {exc}")
            except StreamRefused as exc:
                self._record_error(
                    f"stream refused {exc.status or ''} {exc.code}", "GET /v1/stream", str(exc)
                )
                self.events_caught_up.set()  # nothing will come: let the run go on, the error counted
                return
            except StreamError as exc:  # a malformed frame: start again after it was seen
                self._record_error("stream error", "GET /v1/stream", str(exc))
                await asyncio.sleep(1.0)

    async def _event_log_head(self) -> int | None:
        """The newest event's id (0 for an empty log), or None if the log cannot be read.

        ``GET /v1/events?after=n&limit=1`` answers an event if and only if n < head: the bound is doubled
        until it answers none, then bisected (about 2·log₂(head) calls, however long the log).
        """

        async def beyond(after: int) -> bool | None:
            answer = await self._call(
                "GET", "/v1/events", params={"after": after, "limit": 1}, retries=2, client=self.events_client
            )
            if not answer.ok or not isinstance(answer.body, dict):
                return None
            return bool(answer.body.get("events"))

        low, high = 0, 1  # head >= low; head < high once ``beyond(high)`` is false
        while True:
            more = await beyond(high - 1)
            if more is None:
                return None
            if not more:
                break
            low, high = high, high * 2
        # head in [low, high - 1]: the largest n with beyond(n - 1) true
        while high - low > 1:
            middle = (low + high) // 2
            more = await beyond(middle - 1)
            if more is None:
                return None
            low, high = (middle, high) if more else (low, middle)
        return low

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        topic = str(event.get("topic") or "")
        data = event.get("data") or {}
        if kind == "OfferSent" and self.whatsapp:
            return  # WhatsApp drivers see only the messages the outbox sent
        if kind == "BookingAssigned" and self.whatsapp and topic.startswith("booking:"):
            # A WhatsApp driver's tap gets no answer: the assignment is learnt here.
            booking_id = topic.removeprefix("booking:")
            driver = self.drivers.get(str(data.get("driver_id")))
            if driver is not None and booking_id in self.booking_plan:
                if (booking_id, driver.id) not in self.driven:
                    self.driven.add((booking_id, driver.id))
                    self.actions["ASSIGNED"] += 1
                    self._spawn(self._drive(driver, booking_id, {}))
        if kind == "OfferSent":
            driver_id = (
                topic.removeprefix("driver:") if topic.startswith("driver:") else data.get("driver_id")
            )
            driver = self.drivers.get(str(driver_id))
            booking_id = data.get("booking_id")
            if driver is None or not booking_id:
                return
            offer_key = str(data.get("offer_id") or f"{booking_id}:{driver.id}")
            if offer_key in self.seen_offers:
                return
            self.seen_offers.add(offer_key)
            self._spawn(self._answer_offer(driver, str(booking_id), data))
            return
        status = {
            "BookingAssigned": "ASSIGNED",
            "BookingCompleted": "COMPLETED",
            "BookingTimedOut": "TIMEOUT",
            "BookingCancelled": "CANCELLED",
        }.get(str(kind))
        if status is None or not topic.startswith("booking:"):
            return
        booking_id = topic.removeprefix("booking:")
        if booking_id in self.booking_plan:
            self.live_status[booking_id] = status

    # -- simulated drivers --------------------------------------------------------------------------------

    async def _answer_offer(self, driver: _Driver, booking_id: str, offer: dict[str, Any]) -> None:
        # All random draws happen up front so a driver's choices depend only on the seed and offer order.
        ignore = driver.rng.random() < self.options.ignore_probability
        latency_s = response_latency_trace_s(driver.rng)
        wants = driver.rng.random() < self.options.accept_probability
        if ignore:
            self.offers_ignored += 1
            return
        await asyncio.sleep(latency_s / self.options.speed)
        kind = "ACCEPT" if wants and not driver.busy else "REJECT"
        expires_at = _parse_utc(offer.get("expires_at"))
        tapped_at = self.clock()
        answer = await self._call(
            "POST",
            f"/v1/bookings/{booking_id}/responses",
            json={"driver_id": driver.id, "type": kind, "response_time_ms": round(latency_s * 1000)},
            retries=2,
        )
        if not answer.ok or not isinstance(answer.body, dict):
            return
        action = str(answer.body.get("action"))
        self.actions[action] += 1
        self._count_timeliness(tapped_at, answer.sent_at or tapped_at, expires_at, action)
        if action == "ASSIGNED":
            await self._drive(driver, booking_id, offer)

    def _count_timeliness(
        self, tapped_at: datetime, sent_at: datetime, expires_at: datetime | None, action: str
    ) -> None:
        """Count one answered offer (times UTC): the driver tapped at ``tapped_at``, the request left for
        the server at ``sent_at`` (later when it waited for one of the replay's own connections). Sent
        before ``expires_at`` and answered OFFER_EXPIRED: lost to server lag. Tapped in time but sent too
        late: held past expiry by the replay itself, not the server. An offer without ``expires_at`` is
        not counted."""
        if expires_at is None:
            return
        if sent_at < expires_at:
            self.answers_sent_before_expiry += 1
        else:
            self.answers_sent_after_expiry += 1
            if tapped_at < expires_at:
                self.answers_held_past_expiry += 1
        if lost_to_server_lag(sent_at, expires_at, action):
            self.offers_lost_to_server_lag += 1

    async def _drive(self, driver: _Driver, booking_id: str, offer: dict[str, Any]) -> None:
        # A completion already in flight does not count: the server may have committed it before answering.
        if driver.holding - driver.completing:
            self.double_booked.add(driver.id)
        driver.holding.add(booking_id)
        self.assigned_drivers[booking_id].add(driver.id)
        self.live_status[booking_id] = "ASSIGNED"
        plan = self.booking_plan.get(booking_id)
        if plan is not None:
            pickup = (plan.trip.lat, plan.trip.lon)
            drop = (plan.drop_lat, plan.drop_lon)
        else:
            pickup = (float(offer.get("pickup_lat", driver.lat)), float(offer.get("pickup_lon", driver.lon)))
            drop = (float(offer.get("drop_lat", pickup[0])), float(offer.get("drop_lon", pickup[1])))
        distance = haversine_km(driver.lat, driver.lon, *pickup) + haversine_km(*pickup, *drop)
        try:
            await asyncio.sleep(trip_duration_trace_s(distance) / self.options.speed)
            driver.completing.add(booking_id)
            answer = await self._call(
                "POST",
                f"/v1/bookings/{booking_id}/complete",
                json={"lat": drop[0], "lon": drop[1]},
                retries=2,
            )
            if answer.ok:
                driver.lat, driver.lon = drop
                self.live_status[booking_id] = "COMPLETED"
        finally:
            driver.holding.discard(booking_id)
            driver.completing.discard(booking_id)

    # -- WhatsApp fleet -----------------------------------------------------------------------------------

    async def _fake_stats(self) -> dict[str, Any] | None:
        answer = await self._call("GET", "/stats", retries=2, client=self.fake_client)
        return answer.body if answer.ok and isinstance(answer.body, dict) else None

    async def _check_webhook(self) -> str | None:
        """Why the server cannot take this fleet's taps (no secret, another secret), or None."""
        body = json.dumps({"object": "whatsapp_business_account", "entry": []}).encode()
        answer = await self._post_webhook(body, quiet=frozenset({403, 503}))
        if answer.status == 503:
            return "the server has no DISPATCHD_WHATSAPP_APP_SECRET: it cannot take WhatsApp taps"
        if answer.status == 403:
            return "--webhook-secret is not the server's DISPATCHD_WHATSAPP_APP_SECRET (signature refused)"
        if not answer.ok:
            return f"POST {WEBHOOK_PATH} answered {answer.status}"
        return None

    async def _post_webhook(self, body: bytes, quiet: frozenset[int] = frozenset()) -> _Answer:
        secret = self.options.webhook_secret or ""
        headers = {SIGNATURE_HEADER: sign_webhook(secret, body), "Content-Type": "application/json"}
        # A repeat after a lost answer is a Meta re-delivery: stored once, routed once.
        return await self._call("POST", WEBHOOK_PATH, content=body, headers=headers, retries=2, quiet=quiet)

    async def _poll_whatsapp(self) -> None:
        """Read what the fake accepted since the start, every 0.2 s; hand offer messages to their driver."""
        while not self.stopping.is_set():
            answer = await self._call(
                "GET",
                "/messages",
                params={"after": self.fake_after, "limit": _WHATSAPP_PAGE},
                retries=2,
                client=self.fake_client,
            )
            if not answer.ok or not isinstance(answer.body, dict):
                await asyncio.sleep(1.0)
                continue
            messages = answer.body.get("messages") or []
            for message in messages:
                if isinstance(message, dict):
                    self._on_whatsapp_message(message)
            next_after = answer.body.get("next_after")
            if isinstance(next_after, int):
                self.fake_after = max(self.fake_after, next_after)
            if len(messages) < _WHATSAPP_PAGE:
                await asyncio.sleep(_WHATSAPP_POLL_S)

    def _on_whatsapp_message(self, message: dict[str, Any]) -> None:
        offer = offers_in_message(message)
        if offer is None:
            return
        driver = self.phone_drivers.get(offer.to)
        if driver is None:
            return  # another run's driver, or not a driver
        self.whatsapp_messages_seen += 1
        self.whatsapp_offers_seen += len(offer.choices)
        self._spawn(self._answer_whatsapp(driver, offer))

    async def _answer_whatsapp(self, driver: _Driver, offer: WhatsAppOffer) -> None:
        # Same model as an event-log driver, drawn once per message: ignore it, or read it after the
        # reaction time and accept the first offer listed (nearest first) that is still open for them.
        ignore = driver.rng.random() < self.options.ignore_probability
        latency_s = response_latency_trace_s(driver.rng)
        wants = driver.rng.random() < self.options.accept_probability
        if ignore:
            self.offers_ignored += len(offer.choices)
            return
        await asyncio.sleep(latency_s / self.options.speed)
        closed = {
            choice.booking_id
            for choice in offer.choices
            if self.live_status.get(choice.booking_id) in FINAL_STATUSES
            or choice.booking_id in driver.answered
        }
        tap = choose_reply(offer, accept=wants and not driver.busy, closed=closed)
        if tap is None:
            self.offers_ignored += len(offer.choices) - len(closed)
            return
        answer, reply_id, title, booking_id = tap
        driver.answered.add(booking_id)
        payload = webhook_reply_payload(
            from_wa_id=driver.phone.removeprefix("+"),
            reply_kind="button_reply" if offer.kind == "button" else "list_reply",
            reply_id=reply_id,
            title=title,
            wamid=f"wamid.replay{uuid.uuid4().hex}",
            timestamp=int(time.time()),
            context_wamid=offer.wamid,
            phone_number_id=offer.phone_number_id or "0",
            profile_name=f"Driver {driver.index + 1:03d}",
        )
        posted = await self._post_webhook(json.dumps(payload, separators=(",", ":")).encode())
        if posted.ok:
            self.taps[answer] += 1
