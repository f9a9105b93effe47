"""The outbox summary (issue 7, "Proof"): what was written since T, where it ended, how fast it left.

:func:`outbox_summary` reads the ``notifications`` table; ``GET /v1/notifications/summary``,
``dispatchd notifications summary`` and ``dispatchd replay`` show it. :func:`must_deliver_open` and
:func:`render` are pure (no I/O).

Shape (every count is over rows *written* at or after ``since``; times are UTC, durations seconds)::

    {
      "since": datetime, "at": datetime,                    # the window's start, and now
      "by_category": {category: {status: n}},               # every status present, e.g. SENT, EXPIRED
      "latency_s": {category: {"sent": n, "p50": s, "p99": s, "max": s}},
                                                            # written → sent (sent_at − created_at), over
                                                            # rows SENT / DELIVERED / READ; categories
                                                            # with at least one such row
      "open": n,                                            # PENDING / SENDING / FAILED
      "open_past_expiry": n,                                # PENDING / FAILED with expires_at <= now
      "must_deliver_unsent": {category: n},                 # must-deliver categories (customers, admins:
                                                            # policy.must_deliver) with rows not SENT /
                                                            # DELIVERED / READ / CANCELLED; only n > 0
    }
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from dispatchd.core.db import Database
from dispatchd.core.stats import percentile
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus
from dispatchd.notifications.policy import must_deliver, priority_for

#: Default window of the summary when no ``since`` is given.
DEFAULT_WINDOW = timedelta(hours=1)

#: Statuses that mean the provider accepted the message.
SENT_STATUSES = frozenset(
    {NotificationStatus.SENT.value, NotificationStatus.DELIVERED.value, NotificationStatus.READ.value}
)
#: A must-deliver message in one of these is not "unsent": it was sent, or made moot on purpose.
DELIVERED_OR_MOOT = SENT_STATUSES | {NotificationStatus.CANCELLED.value}
#: Open rows whose expiry should have been applied by the sweeper.
EXPIRABLE_STATUSES = (NotificationStatus.PENDING.value, NotificationStatus.FAILED.value)
_OPEN = frozenset(s.value for s in OPEN_STATUSES)


def is_must_deliver(category: str) -> bool:
    """True for categories that must always reach their recipient (customers' and admins')."""
    return must_deliver(priority_for(category))


async def outbox_summary(db: Database, since: datetime | None = None) -> dict[str, Any]:
    """The outbox since ``since`` (aware UTC; default: the last hour), shaped as in the module docstring.

    ``now`` is the database clock's (the injectable one in tests). Percentiles use
    :func:`dispatchd.core.stats.percentile` (linear interpolation), rounded to the millisecond.
    """
    async with db.read() as session:
        now: datetime = session.info["now"]
        since = since if since is not None else now - DEFAULT_WINDOW
        written = Notification.created_at >= since
        counts = (
            await session.execute(
                select(Notification.category, Notification.status, func.count())
                .where(written)
                .group_by(Notification.category, Notification.status)
            )
        ).all()
        sent_rows = (
            await session.execute(
                select(Notification.category, Notification.created_at, Notification.sent_at).where(
                    written,
                    Notification.status.in_(sorted(SENT_STATUSES)),
                    Notification.sent_at.is_not(None),
                )
            )
        ).all()
        past_expiry = await session.scalar(
            select(func.count()).where(
                written,
                Notification.status.in_(EXPIRABLE_STATUSES),
                Notification.expires_at <= now,
            )
        )
    by_category: dict[str, dict[str, int]] = defaultdict(dict)
    for category, status, count in counts:
        by_category[category][status] = int(count)
    waits: dict[str, list[float]] = defaultdict(list)
    for category, created_at, sent_at in sent_rows:
        waits[category].append((sent_at - created_at).total_seconds())
    return {
        "since": since,
        "at": now,
        "by_category": {
            category: dict(sorted(statuses.items())) for category, statuses in sorted(by_category.items())
        },
        "latency_s": {category: latency(values) for category, values in sorted(waits.items())},
        "open": sum(n for statuses in by_category.values() for s, n in statuses.items() if s in _OPEN),
        "open_past_expiry": int(past_expiry or 0),
        "must_deliver_unsent": must_deliver_unsent(by_category),
    }


def latency(values: list[float]) -> dict[str, Any]:
    """``{"sent": n, "p50": s, "p99": s, "max": s}`` of written → sent durations in seconds (None when
    empty), rounded to the millisecond."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "sent": len(values),
        "p50": rounded(percentile(values, 50)),
        "p99": rounded(percentile(values, 99)),
        "max": rounded(max(values) if values else None),
    }


def must_deliver_unsent(by_category: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Per must-deliver category, rows neither sent nor cancelled (open ones included); only n > 0."""
    unsent = {
        category: sum(n for status, n in statuses.items() if status not in DELIVERED_OR_MOOT)
        for category, statuses in by_category.items()
        if is_must_deliver(category)
    }
    return {category: n for category, n in sorted(unsent.items()) if n}


def must_deliver_open(by_category: Mapping[str, Mapping[str, int]]) -> int:
    """How many rows of must-deliver categories are still open (PENDING / SENDING / FAILED)."""
    return sum(
        n
        for category, statuses in by_category.items()
        if is_must_deliver(category)
        for status, n in statuses.items()
        if status in _OPEN
    )


#: The columns of :func:`render`: heading → the statuses counted in it.
RENDER_GROUPS: tuple[tuple[str, frozenset[str]], ...] = (
    ("sent", SENT_STATUSES),
    ("cancel", frozenset({NotificationStatus.CANCELLED.value})),
    ("expired", frozenset({NotificationStatus.EXPIRED.value})),
    ("failed", frozenset({NotificationStatus.FAILED_PERMANENT.value})),
    ("open", _OPEN),
)


def render(summary: Mapping[str, Any], console: Console, *, title: str = "outbox") -> None:
    """Print a summary (this module's shape; datetimes or ISO strings) as a Rich table that fits 80
    columns: one row per category with its rows sent (SENT / DELIVERED / READ), cancelled, expired,
    failed (FAILED_PERMANENT) and open (PENDING / SENDING / FAILED), written → sent p50 / p99 in seconds;
    then the open rows, those past expiry and the customer/admin messages never sent."""
    by_category: Mapping[str, Mapping[str, int]] = summary.get("by_category") or {}
    latencies: Mapping[str, Mapping[str, Any]] = summary.get("latency_s") or {}
    unsent: Mapping[str, int] = summary.get("must_deliver_unsent") or {}
    table = Table(
        title=f"{title} since {summary.get('since')}: rows by state, written → sent (s)",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("category", no_wrap=True)
    for heading, _ in RENDER_GROUPS:
        table.add_column(heading, justify="right", no_wrap=True)
    table.add_column("p50 s", justify="right", no_wrap=True)
    table.add_column("p99 s", justify="right", no_wrap=True)

    def seconds(value: Any) -> str:
        return "—" if value is None else f"{float(value):.2f}"

    for category, counts in by_category.items():
        times = latencies.get(category) or {}
        label = f"[bold red]{category}[/]" if unsent.get(category) else category
        grouped = [sum(n for status, n in counts.items() if status in group) for _, group in RENDER_GROUPS]
        table.add_row(
            label,
            *(str(n) if n else "·" for n in grouped),
            seconds(times.get("p50")),
            seconds(times.get("p99")),
        )
    console.print(table)
    unsent_text = ", ".join(f"{category} {n}" for category, n in unsent.items()) if unsent else "none"
    style = "bold red" if unsent else "green"
    console.print(
        f"open {summary.get('open', 0)} · open past expiry {summary.get('open_past_expiry', 0)} · "
        f"customer/admin messages never sent: [{style}]{unsent_text}[/]"
    )
