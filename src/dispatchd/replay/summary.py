"""What a replay is asked to do (``ReplayOptions``) and what it found (``ReplaySummary``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dispatchd.notifications import report

FLEETS = ("events", "whatsapp")


#: the server's answer to a response it processed at or after the offer's ``expires_at``
#: (:class:`dispatchd.matching.types.Action`)
OFFER_EXPIRED = "OFFER_EXPIRED"


def lost_to_server_lag(sent_at: datetime, expires_at: datetime, action: str) -> bool:
    """Whether one answer is an offer lost to server lag: the driver sent it (``sent_at``, UTC) before the
    offer's ``expires_at`` (UTC), and the server answered ``OFFER_EXPIRED``, i.e. processed it at or after
    ``expires_at``. An answer sent at or after ``expires_at`` is the driver's lateness, never counted."""
    return sent_at < expires_at and action == OFFER_EXPIRED


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

    Offers lost to server lag (events fleet; None for the WhatsApp fleet, whose taps get no answer):
    ``answers_sent_before_expiry`` answers sent to the server (the replay's clock, UTC, when the request
    left) before the offer's ``expires_at`` (from ``OfferSent``), ``offers_lost_to_server_lag`` those of
    them the server answered ``OFFER_EXPIRED`` (it processed them after the offer expired:
    :func:`lost_to_server_lag`), ``answers_sent_after_expiry`` answers sent when the offer had already
    expired, of which ``answers_held_past_expiry`` were tapped in time but waited for one of the replay's
    own connections (the replay's lag, not the server's). Goal: ``offers_lost_to_server_lag`` = 0.

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
    answers_sent_before_expiry: int | None = None
    answers_sent_after_expiry: int | None = None
    answers_held_past_expiry: int | None = None
    offers_lost_to_server_lag: int | None = None

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
            (
                "offers lost to server lag",
                "—"
                if self.offers_lost_to_server_lag is None
                else must_be_zero(self.offers_lost_to_server_lag),
            ),
            (
                "answers sent before / after expiry",
                "—"
                if self.answers_sent_before_expiry is None
                else f"{self.answers_sent_before_expiry} / {self.answers_sent_after_expiry}",
            ),
            (
                "answers held past expiry by the replay",
                "—" if self.answers_held_past_expiry is None else str(self.answers_held_past_expiry),
            ),
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
