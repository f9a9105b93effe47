"""Replay a real pickup trace against a running dispatchd server (`dispatchd replay`).

The trace is a CSV (optionally gzip) with header ``pickup_at,lat,lon,base``: ``pickup_at`` is naive local
New York time, ``lat``/``lon`` WGS84 degrees. The shipped default, ``data/nyc-2014-04-30-b02512.csv.gz``,
is one day of NYC TLC FOIL pickups (FiveThirtyEight); see ``data/README.md``.

A replay creates simulated drivers over HTTP, posts one booking per trip at the trip's trace time
(compressed by ``speed``), answers the offers the drivers receive, drives the won bookings to completion
and finally reads the server's own records to check that no booking was given to two drivers and no
driver held two bookings at once, and what the outbox did (``GET /v1/notifications/summary``).

Two fleets (``ReplayOptions.fleet``):

- ``events``: drivers learn their offers from the event log (``OfferSent``) and answer through
  ``POST /v1/bookings/{id}/responses``, as a driver app connected to the server would;
- ``whatsapp``: drivers see only what the outbox actually sent. The server sends through the
  ``whatsapp_cloud`` channel to the fake WhatsApp Cloud API (:mod:`dispatchd.testing.fake_whatsapp`);
  the replay reads the fake's ``GET /messages``, and a driver answers an offer message by tapping one of
  its buttons (or list rows): a signed Meta webhook to ``POST /v1/webhooks/whatsapp``. Time to assign is
  then what a WhatsApp-only fleet gets, pacing and coalescing included.

Pure pieces (``load_trips``, ``percentile``, ``haversine_km``, ``synthetic_drop_off``, ``BoundingBox``,
``ReplaySummary``, ``offers_in_message``, ``choose_reply``, ``webhook_reply_payload``, ``sign_webhook``)
have no I/O beyond reading the trace and are unit-tested on their own.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dispatchd.core.stats import percentile
from dispatchd.matching.geo import EARTH_RADIUS_KM, haversine_km
from dispatchd.notifications import report

SHIPPED_TRIPS: Path = Path(__file__).resolve().parent / "data" / "nyc-2014-04-30-b02512.csv.gz"
"""The trace shipped with the package: 2,186 pickups of 2014-04-30, base B02512 (see data/README.md)."""

DRIVER_SPEED_KMH = 25.0
HEARTBEAT_EVERY_TRACE_S = 30.0
HEARTBEATS_PER_S_MAX = 20.0
RESPONSE_LATENCY_MEDIAN_TRACE_S = 6.0
RESPONSE_LATENCY_SIGMA = 0.6
RESPONSE_LATENCY_CAP_TRACE_S = 24.0
DROP_OFF_MIN_KM = 1.0
DROP_OFF_MAX_KM = 8.0
MIN_BOX_SPAN_DEG = 0.1

FINAL_STATUSES = frozenset({"ASSIGNED", "COMPLETED", "TIMEOUT", "CANCELLED"})
ASSIGNED_STATUSES = frozenset({"ASSIGNED", "COMPLETED"})

_EVENTS_PAGE = 500
_EVENTS_IDLE_S = 0.2
_DRAIN_POLL_S = 2.0
_FETCH_CONCURRENCY = 20
_HEARTBEAT_CONCURRENCY = 8
_HTTP_CONNECTIONS = 50
_BACKLOG_SAMPLE_S = 1.0
_OUTBOX_POLL_S = 1.0
_WHATSAPP_POLL_S = 0.2
_WHATSAPP_PAGE = 500

FLEETS = ("events", "whatsapp")
WEBHOOK_PATH = "/v1/webhooks/whatsapp"
SIGNATURE_HEADER = "X-Hub-Signature-256"
#: The business number the simulated drivers write to (metadata of the webhooks; any value works).
BUSINESS_DISPLAY_PHONE = "15550001234"
#: Reply ids of driver offers (buttons and list rows), as ``matching`` writes them.
OFFER_REPLY_ID = re.compile(r"^(ACCEPT|REJECT):(bkg_[0-9a-f]+)$")


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


@dataclass(frozen=True)
class Trip:
    """One pickup of the trace: ``pickup_at`` naive local time of the trace, ``lat``/``lon`` WGS84 degrees."""

    pickup_at: datetime
    lat: float
    lon: float


@dataclass(frozen=True)
class BoundingBox:
    """A lat/lon box in WGS84 degrees, bounds inclusive."""

    min_lat: float
    max_lat: float
    min_lon: float
    max_lon: float

    @classmethod
    def around(cls, trips: Iterable[Trip], min_span_deg: float = MIN_BOX_SPAN_DEG) -> BoundingBox:
        """The box of the trips' pickups, widened about its centre to at least ``min_span_deg`` per side.

        The widening keeps drivers and drop-offs spread out when the selection is a single place.
        Raises ``ValueError`` when ``trips`` is empty.
        """
        trips = list(trips)
        lats = [trip.lat for trip in trips]
        lons = [trip.lon for trip in trips]
        if not lats:
            raise ValueError("no trips to bound")
        return cls(*_widen(min(lats), max(lats), min_span_deg), *_widen(min(lons), max(lons), min_span_deg))

    def contains(self, lat: float, lon: float) -> bool:
        return self.min_lat <= lat <= self.max_lat and self.min_lon <= lon <= self.max_lon

    def clamp(self, lat: float, lon: float) -> tuple[float, float]:
        return min(max(lat, self.min_lat), self.max_lat), min(max(lon, self.min_lon), self.max_lon)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.min_lat + self.max_lat) / 2, (self.min_lon + self.max_lon) / 2

    def random_point(self, rng: random.Random) -> tuple[float, float]:
        """A point drawn uniformly in lat/lon over the box."""
        return rng.uniform(self.min_lat, self.max_lat), rng.uniform(self.min_lon, self.max_lon)


def _widen(low: float, high: float, min_span: float) -> tuple[float, float]:
    if high - low >= min_span:
        return low, high
    mid = (low + high) / 2
    return mid - min_span / 2, mid + min_span / 2


def load_trips(path: Path | str, start: datetime | None = None, end: datetime | None = None) -> list[Trip]:
    """Read a trace CSV (gzip when the file starts with the gzip magic) into trips sorted by pickup time.

    Header must hold ``pickup_at`` (ISO 8601, naive local time), ``lat``, ``lon`` (WGS84 degrees); other
    columns (``base``) are ignored. Keeps ``start <= pickup_at < end`` (either bound optional, both naive
    times of the trace). Raises ``ValueError`` on a missing column, a malformed row or an aware bound.
    """
    for bound in (start, end):
        if bound is not None and bound.tzinfo is not None:
            raise ValueError("start/end must be naive local times of the trace, like pickup_at")
    path = Path(path)
    with path.open("rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if is_gzip else open
    trips: list[Trip] = []
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"pickup_at", "lat", "lon"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for row in reader:
            try:
                pickup_at = datetime.fromisoformat(row["pickup_at"])
                trip = Trip(pickup_at=pickup_at, lat=float(row["lat"]), lon=float(row["lon"]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{reader.line_num}: bad row {row!r}: {exc}") from exc
            if start is not None and pickup_at < start:
                continue
            if end is not None and pickup_at >= end:
                continue
            trips.append(trip)
    trips.sort(key=lambda trip: trip.pickup_at)
    return trips


def destination_point(lat: float, lon: float, bearing_deg: float, distance_km: float) -> tuple[float, float]:
    """The point ``distance_km`` from ``(lat, lon)`` along initial ``bearing_deg`` (0 = north), degrees."""
    delta = distance_km / EARTH_RADIUS_KM
    theta = math.radians(bearing_deg)
    phi1, lmb1 = math.radians(lat), math.radians(lon)
    phi2 = math.asin(math.sin(phi1) * math.cos(delta) + math.cos(phi1) * math.sin(delta) * math.cos(theta))
    lmb2 = lmb1 + math.atan2(
        math.sin(theta) * math.sin(delta) * math.cos(phi1), math.cos(delta) - math.sin(phi1) * math.sin(phi2)
    )
    return math.degrees(phi2), (math.degrees(lmb2) + 540) % 360 - 180


def synthetic_drop_off(
    rng: random.Random,
    lat: float,
    lon: float,
    box: BoundingBox,
    min_km: float = DROP_OFF_MIN_KM,
    max_km: float = DROP_OFF_MAX_KM,
) -> tuple[float, float]:
    """A drop-off ``min_km``–``max_km`` (uniform) from the pickup in a random direction, inside ``box``.

    Tries random bearings first; when none lands in the box (pickup in a corner) it heads for the box
    centre, and only clamps to the box as a last resort, so the distance stays within bounds whenever
    the box has room for it. Returns ``(lat, lon)`` in degrees.
    """
    distance = rng.uniform(min_km, max_km)
    for _ in range(32):
        drop = destination_point(lat, lon, rng.uniform(0.0, 360.0), distance)
        if box.contains(*drop):
            return drop
    c_lat, c_lon = box.centre
    to_centre = haversine_km(lat, lon, c_lat, c_lon)
    distance = min(distance, max(min_km, to_centre))
    return box.clamp(*destination_point(lat, lon, _bearing_deg(lat, lon, c_lat, c_lon), distance))


def _bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dlmb = math.radians(lon2 - lon1)
    y = math.sin(dlmb) * math.cos(phi2)
    x = math.cos(phi1) * math.sin(phi2) - math.sin(phi1) * math.cos(phi2) * math.cos(dlmb)
    return math.degrees(math.atan2(y, x)) % 360


def response_latency_trace_s(rng: random.Random) -> float:
    """A driver's reaction time to an offer, in trace seconds: lognormal, median 6 s, capped at 24 s."""
    latency = rng.lognormvariate(math.log(RESPONSE_LATENCY_MEDIAN_TRACE_S), RESPONSE_LATENCY_SIGMA)
    return min(latency, RESPONSE_LATENCY_CAP_TRACE_S)


def trip_duration_trace_s(distance_km: float) -> float:
    """Trace seconds a simulated driver needs for ``distance_km`` at 25 km/h."""
    return distance_km / DRIVER_SPEED_KMH * 3600.0


@dataclass(frozen=True)
class OfferChoice:
    """One offer a WhatsApp message lets the driver answer: the reply ``id``/``title`` that accepts it,
    and the one that refuses it when the message has one (a coalesced message has only ACCEPT replies)."""

    booking_id: str
    accept_id: str
    accept_title: str
    reject_id: str | None = None
    reject_title: str | None = None


@dataclass(frozen=True)
class WhatsAppOffer:
    """An offer message as sent to the fake: ``to`` (digits, no ``+``), the ``wamid`` the fake answered,
    ``kind`` ``"button"`` (≤ 3 reply buttons) or ``"list"`` (list rows), and the offers in the order the
    message lists them (nearest first)."""

    to: str
    wamid: str | None
    kind: Literal["button", "list"]
    choices: tuple[OfferChoice, ...]
    phone_number_id: str | None = None


def offers_in_message(message: Mapping[str, Any]) -> WhatsAppOffer | None:
    """Read a message recorded by the fake (``GET /messages``: Meta's request JSON plus ``wamid``): the
    offers it carries, or None when it is not an interactive message with at least one
    ``ACCEPT:bkg_<hex>`` reply (text, template, "course prise"…). Buttons are
    ``interactive.action.buttons[].reply{id,title}``; list rows ``interactive.action.sections[].rows[]``.
    """
    if message.get("type") != "interactive":
        return None
    interactive = message.get("interactive")
    if not isinstance(interactive, dict):
        return None
    action = interactive.get("action") if isinstance(interactive.get("action"), dict) else {}
    kind = interactive.get("type")
    replies: list[tuple[str, str]] = []
    if kind == "button":
        for button in action.get("buttons") or []:
            reply = button.get("reply") if isinstance(button, dict) else None
            if isinstance(reply, dict):
                replies.append((str(reply.get("id", "")), str(reply.get("title", ""))))
    elif kind == "list":
        for section in action.get("sections") or []:
            for row in (section.get("rows") or []) if isinstance(section, dict) else []:
                if isinstance(row, dict):
                    replies.append((str(row.get("id", "")), str(row.get("title", ""))))
    else:
        return None
    accepts: dict[str, tuple[str, str]] = {}
    rejects: dict[str, tuple[str, str]] = {}
    for reply_id, title in replies:
        matched = OFFER_REPLY_ID.match(reply_id)
        if matched:
            target = accepts if matched.group(1) == "ACCEPT" else rejects
            target.setdefault(matched.group(2), (reply_id, title))
    if not accepts:
        return None
    choices = tuple(
        OfferChoice(
            booking_id,
            accept_id,
            accept_title,
            *(rejects.get(booking_id) or (None, None)),
        )
        for booking_id, (accept_id, accept_title) in accepts.items()
    )
    wamid = message.get("wamid")
    phone_number_id = message.get("phone_number_id")
    return WhatsAppOffer(
        to=str(message.get("to", "")).removeprefix("+"),
        wamid=str(wamid) if wamid else None,
        kind="button" if kind == "button" else "list",
        choices=choices,
        phone_number_id=str(phone_number_id) if phone_number_id else None,
    )


def choose_reply(
    offer: WhatsAppOffer, *, accept: bool, closed: Iterable[str] = ()
) -> tuple[Literal["ACCEPT", "REJECT"], str, str, str] | None:
    """What a driver taps on ``offer``: ``(answer, reply id, title, booking id)``, or None to leave it.

    ``closed`` are bookings the driver knows are gone (resolved, or already answered by them). With
    ``accept`` the first listed open offer (nearest first) is accepted; otherwise the first open offer
    with a refuse reply is refused, and a message without one (several offers) is left unanswered.
    """
    closed = set(closed)
    open_choices = [choice for choice in offer.choices if choice.booking_id not in closed]
    if not open_choices:
        return None
    if accept:
        choice = open_choices[0]
        return "ACCEPT", choice.accept_id, choice.accept_title, choice.booking_id
    for choice in open_choices:
        if choice.reject_id:
            return "REJECT", choice.reject_id, choice.reject_title or "", choice.booking_id
    return None


def webhook_reply_payload(
    *,
    from_wa_id: str,
    reply_kind: Literal["button_reply", "list_reply"],
    reply_id: str,
    title: str,
    wamid: str,
    timestamp: int,
    context_wamid: str | None = None,
    phone_number_id: str = "0",
    display_phone_number: str = BUSINESS_DISPLAY_PHONE,
    profile_name: str = "Driver",
) -> dict[str, Any]:
    """A Meta webhook delivery of one interactive reply (a tap on a reply button or a list row), shaped
    like Meta's (``object`` → ``entry[]`` → ``changes[]`` → ``value`` with ``metadata``, ``contacts`` and
    one ``messages[]`` item of ``type`` ``interactive``). ``from_wa_id`` is the user's phone without
    ``+``; ``wamid`` must be unique per tap (Meta re-deliveries repeat it); ``context_wamid`` is the id of
    the message tapped; ``timestamp`` is unix seconds."""
    message: dict[str, Any] = {
        "from": from_wa_id,
        "id": wamid,
        "timestamp": str(timestamp),
        "type": "interactive",
        "interactive": {"type": reply_kind, reply_kind: {"id": reply_id, "title": title}},
    }
    if context_wamid:
        message = {"context": {"from": display_phone_number, "id": context_wamid}, **message}
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": phone_number_id,
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": display_phone_number,
                                "phone_number_id": phone_number_id,
                            },
                            "contacts": [{"profile": {"name": profile_name}, "wa_id": from_wa_id}],
                            "messages": [message],
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }


def sign_webhook(app_secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value Meta sends: ``sha256=<hex HMAC-SHA256 of the raw body>``."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Options and summary


@dataclass(frozen=True)
class ReplayOptions:
    """What to replay and how.

    ``start``/``end`` are naive local times of the trace (compared with ``pickup_at``), ``end`` exclusive;
    ``speed`` is trace seconds per real second (60 = one trace minute per second); ``drain_timeout_s`` is
    real seconds to wait, after the last booking, for every booking to reach a final status;
    ``outbox_wait_s`` real seconds to wait after that for every customer and admin message to leave the
    outbox (no must-deliver row PENDING / SENDING / FAILED) before the outbox summary is read.

    ``fleet`` is ``"events"`` (drivers read ``OfferSent`` from the event log) or ``"whatsapp"`` (drivers
    read what the fake WhatsApp server at ``whatsapp_fake_url`` received, and answer with webhooks signed
    with ``webhook_secret``, the server's ``DISPATCHD_WHATSAPP_APP_SECRET``). Raises ``ValueError`` on
    a bad value, or a WhatsApp fleet without its fake URL or secret.
    """

    trips_path: Path
    url: str
    api_key: str
    start: datetime | None
    end: datetime | None
    speed: float
    drivers: int
    seed: int = 7
    accept_probability: float = 0.8
    ignore_probability: float = 0.1
    drain_timeout_s: float = 360.0
    outbox_wait_s: float = 120.0
    fleet: str = "events"
    whatsapp_fake_url: str | None = None
    webhook_secret: str | None = None

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("speed must be > 0")
        if self.drivers < 1:
            raise ValueError("drivers must be >= 1")
        for name in ("accept_probability", "ignore_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        if self.outbox_wait_s < 0:
            raise ValueError("outbox_wait_s must be >= 0")
        if self.fleet not in FLEETS:
            raise ValueError(f"fleet must be one of {', '.join(FLEETS)}")
        if self.fleet == "whatsapp" and not (self.whatsapp_fake_url and self.webhook_secret):
            raise ValueError("a whatsapp fleet needs whatsapp_fake_url and webhook_secret")


@dataclass
class ReplaySummary:
    """Outcome of one replay, read back from the server at the end (counts are over this run's bookings).

    ``time_to_assign_*_s``: seconds from ``search_started_at`` to ``assigned_at`` (server timestamps).
    ``double_assignments``: bookings ASSIGNED to more than one driver (client answers) or with more than
    one ACCEPTED offer (server). ``drivers_double_booked``: drivers that got ASSIGNED while holding
    another booking (client-side). Both must be 0. ``offers_*``: from the server's offer lists;
    ``offers_ignored`` is client-side (offers deliberately left unanswered). ``notifications_written``:
    growth of ``GET /v1/notifications`` ``total`` during the run (None when unreadable).
    ``aborted`` holds the reason when the replay could not run.

    The outbox: ``outbox`` is ``GET /v1/notifications/summary`` read at the end with ``since`` = the
    replay's start (shape in :mod:`dispatchd.notifications.report`: messages by category and state,
    written → sent p50/p99/max by category in seconds, open rows, open rows past expiry, customer and
    admin messages never sent), None when unreadable; ``peak_backlog`` is the largest
    ``GET /v1/notifications/health`` ``backlog`` sampled once a second during the run.

    WhatsApp fleet (zero / None for the events fleet): ``whatsapp_messages_seen`` offer messages the fake
    received for this run's drivers, ``whatsapp_offers_seen`` offers they carried (a coalesced message
    carries several), ``taps_sent`` answers sent by webhook (``{"ACCEPT": n, "REJECT": n}``),
    ``fake_stats`` the fake's ``GET /stats`` at the end and ``pair_limit_hits`` its growth during the run
    (Meta 131056 refusals: messages the outbox sent too soon to one driver).
    """

    trips: int
    drivers: int
    bookings: int
    assigned: int
    completed: int
    timed_out: int
    cancelled: int
    still_searching: int
    time_to_assign_p50_s: float | None
    time_to_assign_p95_s: float | None
    time_to_assign_p99_s: float | None
    double_assignments: int
    drivers_double_booked: int
    notifications_written: int | None
    offers_sent: int
    offers_accepted: int
    offers_rejected: int
    offers_timed_out: int
    offers_ignored: int
    elapsed_s: float
    responses_by_action: dict[str, int] = field(default_factory=dict)
    http_errors: dict[str, int] = field(default_factory=dict)
    aborted: str | None = None
    fleet: str = "events"
    outbox: dict[str, Any] | None = None
    peak_backlog: int | None = None
    whatsapp_messages_seen: int = 0
    whatsapp_offers_seen: int = 0
    taps_sent: dict[str, int] = field(default_factory=dict)
    fake_stats: dict[str, Any] | None = None
    pair_limit_hits: int | None = None

    @property
    def must_deliver_unsent(self) -> dict[str, int]:
        """Customer and admin messages of this run never sent, by category (empty when all were, or when
        the outbox summary could not be read)."""
        return dict((self.outbox or {}).get("must_deliver_unsent") or {})

    @property
    def ok(self) -> bool:
        """True when the replay ran, found no double assignment or double booking, and every customer and
        admin message it caused was sent."""
        return (
            self.aborted is None
            and self.double_assignments == 0
            and self.drivers_double_booked == 0
            and not self.must_deliver_unsent
        )

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-serialisable values."""
        return asdict(self)

    def render(self, console: Console) -> None:
        """Print the summary as a Rich table (plus actions and HTTP errors when there are any)."""
        table = Table(title="dispatchd replay", show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")

        def seconds(value: float | None) -> str:
            return "—" if value is None else f"{value:.2f} s"

        def must_be_zero(value: int) -> str:
            return f"[green]{value}[/]" if value == 0 else f"[bold red]{value}[/]"

        rows: list[tuple[str, str]] = [
            ("trips replayed", str(self.trips)),
            ("drivers", str(self.drivers)),
            ("bookings", str(self.bookings)),
            ("assigned", str(self.assigned)),
            ("completed", str(self.completed)),
            ("timed out", str(self.timed_out)),
            ("cancelled", str(self.cancelled)),
            ("still searching", str(self.still_searching)),
            ("time to assign p50", seconds(self.time_to_assign_p50_s)),
            ("time to assign p95", seconds(self.time_to_assign_p95_s)),
            ("time to assign p99", seconds(self.time_to_assign_p99_s)),
            ("double assignments", must_be_zero(self.double_assignments)),
            ("drivers double-booked", must_be_zero(self.drivers_double_booked)),
            (
                "notifications written",
                "—" if self.notifications_written is None else str(self.notifications_written),
            ),
            ("offers sent", str(self.offers_sent)),
            ("offers accepted", str(self.offers_accepted)),
            ("offers rejected", str(self.offers_rejected)),
            ("offers timed out", str(self.offers_timed_out)),
            ("offers ignored by drivers", str(self.offers_ignored)),
            ("fleet", self.fleet),
        ]
        if self.fleet == "whatsapp":
            rows += [
                ("offer messages seen on WhatsApp", str(self.whatsapp_messages_seen)),
                ("offers seen on WhatsApp", str(self.whatsapp_offers_seen)),
                (
                    "taps sent (accept / reject)",
                    f"{self.taps_sent.get('ACCEPT', 0)} / {self.taps_sent.get('REJECT', 0)}",
                ),
                (
                    "pair-limit hits at the fake",
                    "—" if self.pair_limit_hits is None else must_be_zero(self.pair_limit_hits),
                ),
            ]
        rows += [
            ("peak outbox backlog", "—" if self.peak_backlog is None else str(self.peak_backlog)),
            ("elapsed", seconds(self.elapsed_s)),
        ]
        for name, value in rows:
            table.add_row(name, value)
        console.print(table)
        if self.outbox is not None:
            report.render(self.outbox, console, title="outbox")
        elif self.aborted is None:
            console.print("[yellow]outbox summary unreadable (GET /v1/notifications/summary)[/]")
        for title, counts in (
            ("responses by action", self.responses_by_action),
            ("HTTP errors", self.http_errors),
        ):
            if counts:
                extra = Table(title=title, show_header=False)
                extra.add_column("what")
                extra.add_column("count", justify="right")
                for key, count in sorted(counts.items()):
                    extra.add_row(key, str(count))
                console.print(extra)
        if self.aborted:
            console.print(f"[bold red]replay aborted:[/] {self.aborted}")


# ---------------------------------------------------------------------------------------------------------
# The replay


@dataclass(frozen=True)
class _PlannedBooking:
    index: int
    trip: Trip
    due_s: float
    drop_lat: float
    drop_lon: float

    def payload(self) -> dict[str, Any]:
        number = self.index + 1
        return {
            "customer_name": f"Customer {number:05d}",
            "customer_phone": f"+1646555{number % 10000:04d}",
            "pickup_address": f"{self.trip.lat:.4f},{self.trip.lon:.4f}",
            "pickup_lat": self.trip.lat,
            "pickup_lon": self.trip.lon,
            "drop_address": f"{self.drop_lat:.4f},{self.drop_lon:.4f}",
            "drop_lat": self.drop_lat,
            "drop_lon": self.drop_lon,
        }


@dataclass
class _Driver:
    index: int
    id: str
    lat: float
    lon: float
    rng: random.Random
    phone: str = ""
    holding: set[str] = field(default_factory=set)
    completing: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)  # bookings this driver tapped (WhatsApp fleet)
    heartbeat_in_flight: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.holding)


@dataclass(frozen=True)
class _Answer:
    status: int | None
    body: Any

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _driver_phone(run_part: str, index: int, width: int) -> str:
    # E.164 allows 15 digits: "1212555" + run part + index fills them, so reruns differ in the run part.
    return f"+1212555{run_part}{index:0{width}d}"


def _parse_utc(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # The API's times are UTC; a naive one is read as UTC so the two timestamps always subtract.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class _Replay:
    def __init__(self, options: ReplayOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.rng = random.Random(options.seed)
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)  # ``since`` of the outbox summary
        self.trips: list[Trip] = []
        self.box: BoundingBox | None = None
        self.plans: list[_PlannedBooking] = []
        self.drivers: dict[str, _Driver] = {}
        self.booking_plan: dict[str, _PlannedBooking] = {}
        self.booking_ids: list[str] = []
        self.live_status: dict[str, str] = {}
        self.bookings_sent = 0
        self.seen_offers: set[str] = set()
        self.offers_ignored = 0
        self.assigned_drivers: dict[str, set[str]] = defaultdict(set)
        self.double_booked: set[str] = set()
        self.actions: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.events_caught_up = asyncio.Event()
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.client: httpx.AsyncClient | None = None
        # httpx's pool gets slow (quadratic) with thousands of queued requests: queue them here instead.
        self.in_flight = asyncio.Semaphore(_HTTP_CONNECTIONS)
        self.events_client: httpx.AsyncClient | None = None
        self.fake_client: httpx.AsyncClient | None = None
        self.peak_backlog: int | None = None
        self.phone_drivers: dict[str, _Driver] = {}  # wa_id (phone without "+") → driver
        self.driven: set[tuple[str, str]] = set()  # (booking, driver) pairs already driving
        self.fake_after = 0
        self.fake_stats_before: dict[str, Any] | None = None
        self.whatsapp_messages_seen = 0
        self.whatsapp_offers_seen = 0
        self.taps: Counter[str] = Counter()

    @property
    def whatsapp(self) -> bool:
        return self.options.fleet == "whatsapp"

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _record_error(self, key: str, where: str, detail: str) -> None:
        self.errors[key] += 1
        if self.errors[key] == 1:
            self.console.print(f"[yellow]{key}[/] on {where}: {detail} [dim](further ones only counted)[/]")

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        retries: int = 0,
        retry_transport: bool = True,
        client: httpx.AsyncClient | None = None,
        quiet: frozenset[int] = frozenset(),
    ) -> _Answer:
        """One API call; non-2xx and transport errors are counted, never raised.

        ``retries`` cover 5xx answers (an error answer changes nothing, docs/api.md) and, unless
        ``retry_transport`` is false, transport errors: only for calls safe to repeat (GETs, heartbeats,
        offer responses, which the server answers identically when repeated).
        """
        http = client or self.client
        assert http is not None
        where = f"{method} {path}"
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                request = {"json": json, "content": content, "headers": headers, "params": params}
                if http is self.client:
                    async with self.in_flight:
                        response = await http.request(method, path, **request)
                else:
                    response = await http.request(method, path, **request)
            except httpx.HTTPError as exc:
                if not last and retry_transport:
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                self._record_error(f"transport {type(exc).__name__}", where, str(exc) or repr(exc))
                return _Answer(None, None)
            if response.is_success:
                try:
                    return _Answer(response.status_code, response.json() if response.content else None)
                except ValueError:
                    self._record_error("bad JSON", where, response.text[:200])
                    return _Answer(None, None)
            if response.status_code >= 500 and not last:
                self._count_http_error(response, where)
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code not in quiet:
                self._count_http_error(response, where)
            return _Answer(response.status_code, _problem(response))
        return _Answer(None, None)

    def _count_http_error(self, response: httpx.Response, where: str) -> None:
        problem = _problem(response)
        code = problem.get("code", "") if isinstance(problem, dict) else ""
        detail = problem.get("detail", "") if isinstance(problem, dict) else response.text[:200]
        self._record_error(f"HTTP {response.status_code} {code}".strip(), where, str(detail))

    # -- tasks --------------------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._record_error(f"internal {type(exc).__name__}", "replay task", str(exc))

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

    # -- event log ----------------------------------------------------------------------------------------

    async def _poll_events(self) -> None:
        after = 0
        while not self.stopping.is_set():
            answer = await self._call(
                "GET",
                "/v1/events",
                params={"after": after, "limit": _EVENTS_PAGE},
                retries=2,
                client=self.events_client,
            )
            if not answer.ok or not isinstance(answer.body, dict):
                await asyncio.sleep(1.0)
                continue
            events = answer.body.get("events") or []
            last_id = after
            for event in events:
                try:
                    self._on_event(event)
                    last_id = max(last_id, int(event["id"]))
                except (KeyError, TypeError, ValueError) as exc:
                    self._record_error("malformed event", "GET /v1/events", f"{event!r}: {exc}")
            next_after = answer.body.get("next_after")
            after = max(after, int(next_after) if isinstance(next_after, int) else last_id)
            if len(events) < _EVENTS_PAGE:
                self.events_caught_up.set()
                if not events:
                    await asyncio.sleep(_EVENTS_IDLE_S)

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
        if action == "ASSIGNED":
            await self._drive(driver, booking_id, offer)

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


def _problem(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"detail": response.text[:200]}
