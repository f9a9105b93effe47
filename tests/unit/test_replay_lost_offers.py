"""Offers lost to server lag in the replay: answers a simulated driver sent before the offer's
``expires_at`` that the server processed after it (answered ``OFFER_EXPIRED``).

The server is stubbed with ``httpx.MockTransport`` over a manual clock: each answer takes a scripted
processing time on the server, and the stub answers ``OFFER_EXPIRED`` exactly when it processes the answer
at or after the offer's ``expires_at`` (as :func:`dispatchd.matching.answers.respond` does).
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from rich.console import Console

from dispatchd.replay.base import _Driver
from dispatchd.replay.fleets import _Fleets
from dispatchd.replay.summary import ReplayOptions, ReplaySummary, lost_to_server_lag

T0 = datetime(2026, 11, 30, 18, 0, tzinfo=UTC)


class ManualClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def _fleet(clock: ManualClock, processing_s: dict[str, float], expires: dict[str, datetime]) -> _Fleets:
    """A replay whose server takes ``processing_s[booking]`` seconds (manual clock) to process an answer."""
    options = ReplayOptions(
        trips_path=Path("unused.csv"),
        url="http://stub",
        api_key="dk_stub",
        start=None,
        end=None,
        speed=1e9,  # the drivers' reaction time is ~0 real seconds
        drivers=1,
        ignore_probability=0.0,
        accept_probability=1.0,
    )

    def server(request: httpx.Request) -> httpx.Response:
        booking_id = request.url.path.split("/")[3]
        clock.at += timedelta(seconds=processing_s[booking_id])  # the server's lag
        expired = clock.at >= expires[booking_id]
        return httpx.Response(200, json={"action": "OFFER_EXPIRED" if expired else "REJECTED"})

    fleet = _Fleets(options, Console(quiet=True), clock=clock)
    fleet.client = httpx.AsyncClient(base_url="http://stub", transport=httpx.MockTransport(server))
    return fleet


def _driver() -> _Driver:
    return _Driver(index=0, id="drv_1", lat=40.7, lon=-73.9, rng=random.Random(1), holding={"busy"})


async def _answer(
    fleet: _Fleets, clock: ManualClock, booking_id: str, sent_at: datetime, expires_at: datetime
):
    clock.at = sent_at
    offer = {"booking_id": booking_id, "offer_id": f"ofr_{booking_id}", "expires_at": expires_at.isoformat()}
    await fleet._answer_offer(_driver(), booking_id, offer)


async def test_counts_exactly_the_answers_sent_before_expiry_and_processed_after() -> None:
    expires_at = T0 + timedelta(seconds=30)
    # booking → (sent at, server processing time in s): what the server answers, and whether it counts
    cases = {
        "bkg_early_fast": (T0 + timedelta(seconds=5), 1.0),  # processed at 6 s: in time
        "bkg_early_slow": (T0 + timedelta(seconds=5), 40.0),  # processed at 45 s: lost to server lag
        "bkg_edge_slow": (expires_at - timedelta(milliseconds=1), 0.001),  # processed exactly at expiry: lost
        "bkg_just_in_time": (expires_at - timedelta(milliseconds=2), 0.001),  # processed 1 ms before: in time
        "bkg_late_driver": (expires_at + timedelta(seconds=1), 0.5),  # sent after expiry: the driver's fault
        "bkg_at_expiry": (expires_at, 0.0),  # sent at expiry: not before it
    }
    clock = ManualClock(T0)
    fleet = _fleet(clock, {b: p for b, (_, p) in cases.items()}, dict.fromkeys(cases, expires_at))
    for booking_id, (sent_at, _) in cases.items():
        await _answer(fleet, clock, booking_id, sent_at, expires_at)
    await fleet.client.aclose()

    assert fleet.actions == {"OFFER_EXPIRED": 4, "REJECTED": 2}
    assert fleet.offers_lost_to_server_lag == 2  # bkg_early_slow, bkg_edge_slow
    assert fleet.answers_sent_before_expiry == 4
    assert fleet.answers_sent_after_expiry == 2
    assert fleet.answers_held_past_expiry == 0


async def test_an_answer_the_replay_itself_held_past_expiry_is_not_the_servers_lag() -> None:
    expires_at = T0 + timedelta(seconds=30)
    clock = ManualClock(T0)
    fleet = _fleet(clock, {"bkg_held": 0.1}, {"bkg_held": expires_at})
    fleet.in_flight = asyncio.Semaphore(0)  # every one of the replay's connections is busy
    offer = {"booking_id": "bkg_held", "offer_id": "ofr_held", "expires_at": expires_at.isoformat()}
    clock.at = T0 + timedelta(seconds=10)  # the driver taps 20 s before expiry…
    answering = asyncio.ensure_future(fleet._answer_offer(_driver(), "bkg_held", offer))
    for _ in range(5):
        await asyncio.sleep(0)
    clock.at = expires_at + timedelta(seconds=5)  # …and a connection frees up 5 s after it
    fleet.in_flight.release()
    await answering
    await fleet.client.aclose()

    assert fleet.actions == {"OFFER_EXPIRED": 1}
    assert (fleet.answers_sent_before_expiry, fleet.answers_sent_after_expiry) == (0, 1)
    assert fleet.answers_held_past_expiry == 1
    assert fleet.offers_lost_to_server_lag == 0


async def test_zero_when_no_answer_is_processed_late() -> None:
    clock = ManualClock(T0)
    bookings = [f"bkg_{i}" for i in range(20)]
    expires = {b: T0 + timedelta(seconds=30 + i) for i, b in enumerate(bookings)}
    fleet = _fleet(clock, dict.fromkeys(bookings, 0.25), expires)
    for i, booking_id in enumerate(bookings):
        await _answer(fleet, clock, booking_id, T0 + timedelta(seconds=i), expires[booking_id])
    await fleet.client.aclose()

    assert fleet.actions == {"REJECTED": 20}
    assert fleet.answers_sent_before_expiry == 20
    assert fleet.answers_sent_after_expiry == 0
    assert fleet.offers_lost_to_server_lag == 0


def test_the_rule_compares_the_sent_time_with_expiry_and_needs_offer_expired() -> None:
    expires_at = T0 + timedelta(seconds=30)
    assert lost_to_server_lag(T0, expires_at, "OFFER_EXPIRED")
    assert not lost_to_server_lag(T0, expires_at, "ALREADY_TAKEN")
    assert not lost_to_server_lag(expires_at, expires_at, "OFFER_EXPIRED")


def test_summary_prints_the_lost_offers() -> None:
    summary = ReplaySummary(
        trips=1,
        drivers=1,
        bookings=1,
        assigned=1,
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
        offers_sent=3,
        offers_accepted=1,
        offers_rejected=0,
        offers_timed_out=2,
        offers_ignored=0,
        elapsed_s=1.0,
        answers_sent_before_expiry=3,
        answers_sent_after_expiry=0,
        answers_held_past_expiry=0,
        offers_lost_to_server_lag=2,
    )
    console = Console(record=True, width=100)
    summary.render(console)
    text = console.export_text()
    lines = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in text.splitlines() if "│" in line
    }
    assert lines["offers lost to server lag"] == "2"
    assert lines["answers sent before / after expiry"] == "3 / 0"
