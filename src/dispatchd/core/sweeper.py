"""The deadline loop (DESIGN.md, idea 3): deadlines are columns, one sweeper per process claims due rows.

A domain registers a :class:`Deadline`: ``handle(db, limit)`` claims at most ``limit`` due rows in one
transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several instances share the work) and returns
how many it handled; ``oldest_due(session, now)`` tells the age of the backlog for ``/ready``.
Because the deadline is in the row, a restart, a crash or a second instance changes nothing: whatever
fell due while the server was down is handled at the first tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import metrics
from dispatchd.core.db import Database
from dispatchd.core.logging import get_logger

log = get_logger("dispatchd.sweeper")

MAX_BATCHES_PER_TICK = 20


#: Phases of a tick: what people said first (inbound routing), then the domains' own deadlines, then
#: the clean-up of what those made moot (expired outbox messages).
INBOUND, DOMAIN, CLEANUP = 0, 1, 2


@dataclass(frozen=True)
class Deadline:
    """One kind of deadline. Within a tick, handlers run by ``phase``, then in registration order."""

    name: str
    handle: Callable[[Database, int], Awaitable[int]]
    oldest_due: Callable[[AsyncSession, datetime], Awaitable[datetime | None]]
    phase: int = DOMAIN


class Sweeper:
    """Runs every registered deadline handler every ``interval_s`` seconds."""

    def __init__(self, db: Database, *, interval_s: float = 0.5, batch_size: int = 500) -> None:
        self.db = db
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.deadlines: list[Deadline] = []
        self.last_tick_monotonic: float | None = None
        self.last_error: str | None = None
        #: the clock's time (UTC) of the last tick that ran to its end, for the alert monitor (a
        #: ManualClock moves it in tests; ``last_tick_monotonic`` serves ``/ready``)
        self.last_tick_at: datetime | None = None
        #: the last deadline handler failure: when (clock, UTC), which deadline, the exception's class
        self.last_failure_at: datetime | None = None
        self.last_failure: tuple[str, str] | None = None
        #: deadline handler failures since the process started
        self.failures_total = 0

    def register(self, deadline: Deadline) -> None:
        self.deadlines.append(deadline)
        self.deadlines.sort(key=lambda registered: registered.phase)  # stable: registration order kept

    async def run_once(self) -> dict[str, int]:
        """Handle everything due now; return ``{deadline name: rows handled}``."""
        handled: dict[str, int] = {}
        failed: list[str] = []
        for deadline in self.deadlines:
            total = 0
            try:
                for _ in range(MAX_BATCHES_PER_TICK):
                    count = await deadline.handle(self.db, self.batch_size)
                    total += count
                    if count < self.batch_size:
                        break
            except Exception as exc:  # one failing deadline must not starve the others
                failed.append(f"{deadline.name}: {exc!r}")
                self.last_failure_at = self.db.clock.now()
                self.last_failure = (deadline.name, type(exc).__name__)
                self.failures_total += 1
                log.exception("deadline handler failed", deadline=deadline.name)
            handled[deadline.name] = total
            if total:
                metrics.SWEEPER_HANDLED.labels(deadline.name).inc(total)
        metrics.SWEEPER_TICKS.inc()
        self.last_tick_monotonic = time.monotonic()
        self.last_tick_at = self.db.clock.now()
        self.last_error = "; ".join(failed) or None
        return handled

    async def lag_s(self) -> float:
        """Seconds since the oldest deadline that is due and not yet handled (0 when none)."""
        async with self.db.read() as session:
            now = session.info["now"]
            oldest = [await d.oldest_due(session, now) for d in self.deadlines]
        due = [when for when in oldest if when is not None]
        lag = max(0.0, (now - min(due)).total_seconds()) if due else 0.0
        metrics.SWEEPER_LAG.set(lag)
        return lag

    def seconds_since_tick(self) -> float | None:
        if self.last_tick_monotonic is None:
            return None
        return time.monotonic() - self.last_tick_monotonic

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; an error is logged and the next tick tries again."""
        while not stop.is_set():
            try:
                handled = await self.run_once()
                if any(handled.values()):
                    log.info("sweeper handled deadlines", **handled)
            except Exception as exc:  # a broken tick must not kill the loop
                self.last_error = repr(exc)
                log.exception("sweeper tick failed")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
