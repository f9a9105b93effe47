"""The replay's state and plumbing: planned bookings, simulated drivers, API calls (errors counted,
never raised) and background tasks. :mod:`dispatchd.replay.fleets` and :mod:`dispatchd.replay.runner`
build the replay on top of it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from rich.console import Console

from dispatchd.replay.summary import ReplayOptions
from dispatchd.replay.trace import BoundingBox, Trip

FINAL_STATUSES = frozenset({"ASSIGNED", "COMPLETED", "TIMEOUT", "CANCELLED"})
ASSIGNED_STATUSES = frozenset({"ASSIGNED", "COMPLETED"})

_FETCH_CONCURRENCY = 20
_HTTP_CONNECTIONS = 50


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
    #: when the request left for the server (the replay's clock, UTC; the last attempt's), after any wait
    #: for one of the replay's own connections
    sent_at: datetime | None = None

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


class _ReplayBase:
    """A replay's state, its API calls and its background tasks (the rest of ``_Replay``)."""

    def __init__(
        self, options: ReplayOptions, console: Console, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.options = options
        self.console = console
        #: the drivers' wall clock (UTC), compared with the server's ``expires_at``: same machine or NTP
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
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
        # offers lost to server lag (events fleet): see ReplaySummary
        self.answers_sent_before_expiry = 0
        self.answers_sent_after_expiry = 0
        self.answers_held_past_expiry = 0
        self.offers_lost_to_server_lag = 0

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
        sent_at: datetime | None = None
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                request = {"json": json, "content": content, "headers": headers, "params": params}
                if http is self.client:
                    async with self.in_flight:
                        sent_at = self.clock()
                        response = await http.request(method, path, **request)
                else:
                    sent_at = self.clock()
                    response = await http.request(method, path, **request)
            except httpx.HTTPError as exc:
                if not last and retry_transport:
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                self._record_error(f"transport {type(exc).__name__}", where, str(exc) or repr(exc))
                return _Answer(None, None)
            if response.is_success:
                try:
                    body = response.json() if response.content else None
                    return _Answer(response.status_code, body, sent_at)
                except ValueError:
                    self._record_error("bad JSON", where, response.text[:200])
                    return _Answer(None, None)
            if response.status_code >= 500 and not last:
                self._count_http_error(response, where)
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if response.status_code not in quiet:
                self._count_http_error(response, where)
            return _Answer(response.status_code, _problem(response), sent_at)
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


def _problem(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"detail": response.text[:200]}
