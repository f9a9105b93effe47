"""``run_replay``: set the replay up, send the bookings at their trace times, drain them, wait for the
outbox and read everything back from the server.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dispatchd.core.stats import percentile
from dispatchd.notifications import report
from dispatchd.replay.base import (
    _FETCH_CONCURRENCY,
    _HTTP_CONNECTIONS,
    FINAL_STATUSES,
    _Driver,
    _driver_phone,
    _parse_utc,
    _PlannedBooking,
)
from dispatchd.replay.fleets import _Fleets
from dispatchd.replay.summary import ReplayOptions, ReplaySummary
from dispatchd.replay.trace import BoundingBox, load_trips, synthetic_drop_off

HEARTBEAT_EVERY_TRACE_S = 30.0
HEARTBEATS_PER_S_MAX = 20.0

_DRAIN_POLL_S = 2.0
_HEARTBEAT_CONCURRENCY = 8
_BACKLOG_SAMPLE_S = 1.0
_OUTBOX_POLL_S = 1.0


class _Replay(_Fleets):
    """One replay: ``_ReplayBase`` (state, HTTP, tasks) and ``_Fleets`` (the drivers), plus setup, bookings,
    outbox, read-back and the main sequence."""

    # -- setup --------------------------------------------------------------------------------------------

    def _plan(self) -> None:
        assert self.box is not None
        first = self.trips[0].pickup_at
        for index, trip in enumerate(self.trips):
            drop_lat, drop_lon = synthetic_drop_off(self.rng, trip.lat, trip.lon, self.box)
            due_s = (trip.pickup_at - first).total_seconds() / self.options.speed
            self.plans.append(_PlannedBooking(index, trip, due_s, round(drop_lat, 6), round(drop_lon, 6)))

    async def _create_drivers(self) -> None:
        assert self.box is not None
        width = max(3, len(str(self.options.drivers)))
        positions = [self.box.random_point(self.rng) for _ in range(self.options.drivers)]
        kinds = [self.rng.choice(("Sedan", "Sedan", "SUV")) for _ in range(self.options.drivers)]
        ratings = [round(self.rng.uniform(4.3, 5.0), 1) for _ in range(self.options.drivers)]

        async def create(index: int) -> None:
            lat, lon = positions[index]
            body = {
                "name": f"Driver {index + 1:03d}",
                "vehicle_type": kinds[index],
                "vehicle_plate": f"T{index + 1:06d}C",
                "rating": ratings[index],
                "status": "AVAILABLE",
                "lat": round(lat, 6),
                "lon": round(lon, 6),
            }
            for attempt in range(4):
                # A fresh random run part on each try: reruns against the same database must not collide.
                run_part = f"{secrets.randbelow(10 ** (8 - width)):0{8 - width}d}"
                body["phone"] = _driver_phone(run_part, index + 1, width)
                quiet = frozenset({409}) if attempt < 3 else frozenset()
                answer = await self._call(
                    "POST", "/v1/drivers", json=body, quiet=quiet, retries=2, retry_transport=False
                )
                if answer.status == 409:
                    continue
                if answer.ok and isinstance(answer.body, dict) and "id" in answer.body:
                    driver_id = str(answer.body["id"])
                    driver = _Driver(
                        index=index,
                        id=driver_id,
                        lat=body["lat"],
                        lon=body["lon"],
                        rng=random.Random(f"{self.options.seed}:driver:{index}"),
                        phone=str(body["phone"]),
                    )
                    self.drivers[driver_id] = driver
                    self.phone_drivers[driver.phone.removeprefix("+")] = driver
                return

        semaphore = asyncio.Semaphore(_FETCH_CONCURRENCY)

        async def bounded(index: int) -> None:
            async with semaphore:
                await create(index)

        await asyncio.gather(*(bounded(index) for index in range(self.options.drivers)))

    async def _notifications_total(self) -> int | None:
        answer = await self._call("GET", "/v1/notifications", params={"limit": 1}, retries=2)
        if answer.ok and isinstance(answer.body, dict) and isinstance(answer.body.get("total"), int):
            return int(answer.body["total"])
        return None

    # -- outbox -------------------------------------------------------------------------------------------

    async def _sample_backlog(self) -> None:
        """``GET /v1/notifications/health`` once a second: the largest ``backlog`` seen."""
        while not self.stopping.is_set():
            answer = await self._call("GET", "/v1/notifications/health", client=self.events_client)
            if answer.ok and isinstance(answer.body, dict) and isinstance(answer.body.get("backlog"), int):
                self.peak_backlog = max(self.peak_backlog or 0, int(answer.body["backlog"]))
            await asyncio.sleep(_BACKLOG_SAMPLE_S)

    async def _read_outbox(self) -> dict[str, Any] | None:
        answer = await self._call(
            "GET",
            "/v1/notifications/summary",
            params={"since": self.started_at.isoformat()},
            retries=2,
            client=self.events_client,
        )
        return answer.body if answer.ok and isinstance(answer.body, dict) else None

    async def _wait_outbox(self) -> dict[str, Any] | None:
        """The outbox summary once no customer or admin message is open, or after ``outbox_wait_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.outbox_wait_s
        summary = await self._read_outbox()
        polls = 0
        while summary is not None:
            waiting = report.must_deliver_open(summary.get("by_category") or {})
            if not waiting:
                break
            if loop.time() >= deadline:
                self.console.print(
                    f"[yellow]{waiting} customer/admin messages still open after "
                    f"{self.options.outbox_wait_s:g} s[/]"
                )
                break
            if polls % 10 == 0:
                self.console.print(f"waiting for {waiting} customer/admin messages to leave the outbox…")
            polls += 1
            await asyncio.sleep(min(_OUTBOX_POLL_S, max(0.0, deadline - loop.time())))
            summary = await self._read_outbox()
        return summary

    async def _heartbeats(self) -> None:
        # Every 30 trace s, but at most once a real second per driver and HEARTBEATS_PER_S_MAX in all:
        # heartbeats are writes, and at high speed they would crowd out the offer answers being measured.
        interval = max(
            HEARTBEAT_EVERY_TRACE_S / self.options.speed, 1.0, len(self.drivers) / HEARTBEATS_PER_S_MAX
        )
        semaphore = asyncio.Semaphore(_HEARTBEAT_CONCURRENCY)

        async def beat(driver: _Driver) -> None:
            driver.heartbeat_in_flight = True
            try:
                async with semaphore:
                    await self._call(
                        "POST",
                        f"/v1/drivers/{driver.id}/heartbeat",
                        json={"lat": driver.lat, "lon": driver.lon},
                        retries=1,
                    )
            finally:
                driver.heartbeat_in_flight = False

        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            round_start = loop.time()
            drivers = list(self.drivers.values())
            # Spread one round evenly over the interval: a steady trickle, not a burst of N requests.
            for position, driver in enumerate(drivers):
                delay = round_start + interval * position / len(drivers) - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not driver.heartbeat_in_flight:
                    self._spawn(beat(driver))
            delay = round_start + interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)

    # -- bookings -----------------------------------------------------------------------------------------

    async def _book(self, plan: _PlannedBooking) -> None:
        answer = await self._call(
            "POST", "/v1/bookings", json=plan.payload(), retries=2, retry_transport=False
        )
        self.bookings_sent += 1
        if not answer.ok or not isinstance(answer.body, dict) or "id" not in answer.body:
            return
        booking_id = str(answer.body["id"])
        self.booking_plan[booking_id] = plan
        self.booking_ids.append(booking_id)
        self.live_status.setdefault(booking_id, "PENDING")
        # A repeat after a lost success answers 409 INVALID_STATE, which is harmless and counted.
        matching = await self._call("POST", f"/v1/bookings/{booking_id}/matching", json={}, retries=2)
        if matching.ok and self.live_status.get(booking_id) == "PENDING":
            self.live_status[booking_id] = "SEARCHING"

    async def _send_bookings(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending: list[asyncio.Task[Any]] = []
        for plan in self.plans:
            delay = start + plan.due_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(self._spawn(self._book(plan)))
        await asyncio.gather(*pending, return_exceptions=True)

    async def _drain(self, progress: Progress, task_id: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.drain_timeout_s
        semaphore = asyncio.Semaphore(_FETCH_CONCURRENCY)

        async def refresh(booking_id: str) -> None:
            async with semaphore:
                answer = await self._call("GET", f"/v1/bookings/{booking_id}", retries=1)
            if answer.ok and isinstance(answer.body, dict) and answer.body.get("status"):
                self.live_status[booking_id] = str(answer.body["status"])

        while True:
            open_ids = [b for b in self.booking_ids if self.live_status.get(b) not in FINAL_STATUSES]
            progress.update(task_id, description=f"draining: {len(open_ids)} not final")
            if not open_ids or loop.time() >= deadline:
                return
            await asyncio.gather(*(refresh(booking_id) for booking_id in open_ids))
            if all(self.live_status.get(b) in FINAL_STATUSES for b in open_ids):
                return
            await asyncio.sleep(min(_DRAIN_POLL_S, max(0.0, deadline - loop.time())))

    def _live_counts(self) -> dict[str, int]:
        statuses = Counter(self.live_status.values())
        return {
            "assigned": statuses["ASSIGNED"] + statuses["COMPLETED"],
            "timed_out": statuses["TIMEOUT"],
        }

    async def _tick(self, progress: Progress, task_id: Any) -> None:
        while True:
            progress.update(task_id, completed=self.bookings_sent, **self._live_counts())
            await asyncio.sleep(0.25)

    # -- summary ------------------------------------------------------------------------------------------

    async def _summarise(self, notifications_before: int | None) -> ReplaySummary:
        semaphore = asyncio.Semaphore(_FETCH_CONCURRENCY)

        async def fetch(booking_id: str) -> tuple[str, Any, Any]:
            async with semaphore:
                booking = await self._call("GET", f"/v1/bookings/{booking_id}", retries=2)
                offers = await self._call("GET", f"/v1/bookings/{booking_id}/offers", retries=2)
            return booking_id, booking.body if booking.ok else None, offers.body if offers.ok else None

        fetched = await asyncio.gather(*(fetch(booking_id) for booking_id in self.booking_ids))
        statuses: Counter[str] = Counter()
        waits: list[float] = []
        offer_responses: Counter[str] = Counter()
        offers_sent = 0
        doubled = {b for b, drivers in self.assigned_drivers.items() if len(drivers) > 1}
        for booking_id, booking, offers in fetched:
            if isinstance(booking, dict):
                statuses[str(booking.get("status"))] += 1
                started, assigned = (
                    _parse_utc(booking.get("search_started_at")),
                    _parse_utc(booking.get("assigned_at")),
                )
                if started is not None and assigned is not None:
                    waits.append((assigned - started).total_seconds())
            else:
                statuses[self.live_status.get(booking_id, "UNKNOWN")] += 1
            if isinstance(offers, dict):
                offers = offers.get("offers")
            if isinstance(offers, list):
                offers_sent += len(offers)
                responses = Counter(str(offer.get("response")) for offer in offers if isinstance(offer, dict))
                offer_responses.update(responses)
                if responses["ACCEPTED"] > 1:
                    doubled.add(booking_id)
        notifications_after = await self._notifications_total()
        written = (
            notifications_after - notifications_before
            if notifications_after is not None and notifications_before is not None
            else None
        )
        return ReplaySummary(
            trips=len(self.trips),
            drivers=len(self.drivers),
            bookings=len(self.booking_ids),
            assigned=statuses["ASSIGNED"] + statuses["COMPLETED"],
            completed=statuses["COMPLETED"],
            timed_out=statuses["TIMEOUT"],
            cancelled=statuses["CANCELLED"],
            still_searching=statuses["PENDING"] + statuses["SEARCHING"],
            time_to_assign_p50_s=percentile(waits, 50),
            time_to_assign_p95_s=percentile(waits, 95),
            time_to_assign_p99_s=percentile(waits, 99),
            double_assignments=len(doubled),
            drivers_double_booked=len(self.double_booked),
            notifications_written=written,
            offers_sent=offers_sent,
            offers_accepted=offer_responses["ACCEPTED"],
            offers_rejected=offer_responses["REJECTED"],
            offers_timed_out=offer_responses["TIMEOUT"],
            offers_ignored=self.offers_ignored,
            elapsed_s=round(time.monotonic() - self.started, 3),
            responses_by_action=dict(self.actions),
            http_errors=dict(self.errors),
        )

    def _aborted(self, reason: str) -> ReplaySummary:
        return ReplaySummary(
            trips=len(self.trips),
            drivers=len(self.drivers),
            bookings=len(self.booking_ids),
            assigned=0,
            completed=0,
            timed_out=0,
            cancelled=0,
            still_searching=0,
            time_to_assign_p50_s=None,
            time_to_assign_p95_s=None,
            time_to_assign_p99_s=None,
            double_assignments=0,
            drivers_double_booked=0,
            notifications_written=None,
            offers_sent=0,
            offers_accepted=0,
            offers_rejected=0,
            offers_timed_out=0,
            offers_ignored=0,
            elapsed_s=round(time.monotonic() - self.started, 3),
            responses_by_action=dict(self.actions),
            http_errors=dict(self.errors),
            aborted=reason,
            fleet=self.options.fleet,
        )

    # -- main ---------------------------------------------------------------------------------------------

    async def run(self) -> ReplaySummary:
        options = self.options
        try:
            self.trips = await asyncio.to_thread(load_trips, options.trips_path, options.start, options.end)
        except (OSError, ValueError) as exc:
            return self._aborted(f"cannot read trips: {exc}")
        if not self.trips:
            return self._aborted(f"no trips in {options.trips_path} within [{options.start}, {options.end})")
        self.box = BoundingBox.around(self.trips)
        self._plan()
        span_s = (self.trips[-1].pickup_at - self.trips[0].pickup_at).total_seconds()
        self.console.print(
            f"Replaying {len(self.trips)} trips ({self.trips[0].pickup_at} → {self.trips[-1].pickup_at}) "
            f"at ×{options.speed:g}: about {span_s / options.speed:.0f} s, with {options.drivers} drivers"
        )
        headers = {"Authorization": f"Bearer {options.api_key}"}
        base_url = options.url.rstrip("/")
        # No pool timeout: under load requests queue for a connection instead of failing.
        timeout = httpx.Timeout(30.0, pool=None)
        limits = httpx.Limits(max_connections=_HTTP_CONNECTIONS, max_keepalive_connections=_HTTP_CONNECTIONS)
        fake_url = (options.whatsapp_fake_url or "http://fake.invalid").rstrip("/")
        async with (
            httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as client,
            httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as events_client,
            httpx.AsyncClient(base_url=fake_url, timeout=timeout) as fake_client,
        ):
            self.client, self.events_client, self.fake_client = client, events_client, fake_client
            probe = await self._call("GET", "/v1/events", params={"after": 0, "limit": 1}, retries=2)
            if not probe.ok:
                return self._aborted(f"cannot read the event log at {base_url} (status {probe.status})")
            if self.whatsapp:
                self.fake_stats_before = await self._fake_stats()
                if self.fake_stats_before is None:
                    return self._aborted(f"cannot read the fake WhatsApp server at {fake_url}/stats")
                self.fake_after = int(self.fake_stats_before.get("recorded") or 0)
                refused = await self._check_webhook()
                if refused:
                    return self._aborted(refused)
            try:
                return await self._run_with()
            finally:
                await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        self.stopping.set()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_with(self) -> ReplaySummary:
        notifications_before = await self._notifications_total()
        self._spawn(self._poll_events())
        self.console.print(f"Creating {self.options.drivers} drivers…")
        await self._create_drivers()
        if not self.drivers:
            return self._aborted("no driver could be created")
        if len(self.drivers) < self.options.drivers:
            self.console.print(
                f"[yellow]only {len(self.drivers)} of {self.options.drivers} drivers created[/]"
            )
        self.console.print("Catching up with the event log…")
        await self.events_caught_up.wait()
        self._spawn(self._heartbeats())
        self._spawn(self._sample_backlog())
        if self.whatsapp:
            self._spawn(self._poll_whatsapp())
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("assigned {task.fields[assigned]} · timed out {task.fields[timed_out]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        with progress:
            task_id = progress.add_task("bookings", total=len(self.plans), assigned=0, timed_out=0)
            ticker = self._spawn(self._tick(progress, task_id))
            await self._send_bookings()
            await self._drain(progress, task_id)
            ticker.cancel()
            progress.update(task_id, completed=self.bookings_sent, **self._live_counts())
        # Drivers still on a trip are abandoned here: their bookings stay ASSIGNED on the server.
        await self._stop_tasks()
        self.console.print("Reading back bookings and offers…")
        summary = await self._summarise(notifications_before)
        summary.outbox = await self._wait_outbox()
        summary.peak_backlog = self.peak_backlog
        summary.fleet = self.options.fleet
        if not self.whatsapp:
            summary.answers_sent_before_expiry = self.answers_sent_before_expiry
            summary.answers_sent_after_expiry = self.answers_sent_after_expiry
            summary.answers_held_past_expiry = self.answers_held_past_expiry
            summary.offers_lost_to_server_lag = self.offers_lost_to_server_lag
        if self.whatsapp:
            summary.whatsapp_messages_seen = self.whatsapp_messages_seen
            summary.whatsapp_offers_seen = self.whatsapp_offers_seen
            summary.taps_sent = dict(self.taps)
            summary.fake_stats = await self._fake_stats()
            if summary.fake_stats is not None and self.fake_stats_before is not None:
                summary.pair_limit_hits = int(summary.fake_stats.get("pair_limit_hits") or 0) - int(
                    self.fake_stats_before.get("pair_limit_hits") or 0
                )
            if summary.offers_sent and not self.whatsapp_messages_seen:
                self.console.print(
                    "[yellow]no offer reached the fake WhatsApp server: is the server started with "
                    "DISPATCHD_NOTIFICATION_CHANNEL=whatsapp_cloud and DISPATCHD_WHATSAPP_API_BASE_URL="
                    f"{self.options.whatsapp_fake_url}/v21.0?[/]"
                )
        summary.elapsed_s = round(time.monotonic() - self.started, 3)
        return summary


async def run_replay(options: ReplayOptions, console: Console) -> ReplaySummary:
    """Replay ``options.trips_path`` against the server at ``options.url``; return what the server recorded.

    Creates ``options.drivers`` drivers, posts one booking (then starts its matching) per trip at
    ``(pickup_at - first pickup) / speed`` real seconds, answers the offers drivers receive (through
    ``GET /v1/events``, or for the WhatsApp fleet through the fake's ``GET /messages`` and signed
    webhooks), completes won bookings after the trip's drive time at 25 km/h, waits up to
    ``drain_timeout_s`` for every booking to be final, then reads each booking and its offers back, waits
    up to ``outbox_wait_s`` for the customer and admin messages to leave the outbox, and reads the outbox
    summary (``since`` = the replay's start, UTC; the server's clock is assumed in step with this one).
    HTTP errors are counted and printed once per status and code; nothing is raised for them. When the
    replay cannot run (unreadable trace, no trip selected, server unreachable or key refused, WhatsApp
    fleet without a reachable fake or with a webhook secret the server refuses) the summary comes back
    with ``aborted`` set.
    """
    return await _Replay(options, console).run()
