"""The outbox read from ``bench.bench_outbox_peak``'s SQLite file: the backlog sampled during the run
(:class:`Sampler`, peaks kept) and the whole table at the end (:func:`final_table`).

Only the columns in ``COLUMNS`` are read, so the same code runs on the outbox before and after a schema
change. Times are SQLAlchemy's SQLite text (naive UTC); an explicit offset is honoured. Percentiles: linear
interpolation between closest ranks (numpy's default)."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

OPEN = ("PENDING", "SENDING", "FAILED")
SENT = ("SENT", "DELIVERED", "READ")
STATUS_ORDER = (
    "PENDING", "SENDING", "FAILED", "SENT", "DELIVERED", "READ", "FAILED_PERMANENT", "CANCELLED", "EXPIRED"
)  # fmt: skip
COLUMNS = "id, category, recipient, status, created_at, sent_at, expires_at, next_attempt_at"


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100), linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_time(value: Any) -> datetime | None:
    """A stored UTC time (SQLAlchemy's SQLite text: naive UTC; an explicit offset is honoured)."""
    if value is None:
        return None
    if isinstance(value, int | float):  # not written by SQLAlchemy's DateTime; accepted as epoch seconds
        return datetime.fromtimestamp(value, UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


# ------------------------------------------------------------------------------------------- the sampler


@dataclass
class Peak:
    value: int = 0
    at_s: float | None = None
    phase: str | None = None

    def offer(self, value: int, at_s: float, phase: str) -> None:
        if value > self.value:
            self.value, self.at_s, self.phase = value, at_s, phase


@dataclass
class Sampler:
    """Reads the open backlog from the SQLite file, read-only, one short connection per sample."""

    db_path: Path
    started: float  # time.monotonic() of the replay's start
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    peak_open: Peak = field(default_factory=Peak)
    peak_pending_past_expiry: Peak = field(default_factory=Peak)
    peak_open_past_expiry: Peak = field(default_factory=Peak)
    peak_one_recipient: Peak = field(default_factory=Peak)
    peak_by_category: dict[str, Peak] = field(default_factory=lambda: defaultdict(Peak))
    peak_by_status: dict[str, Peak] = field(default_factory=lambda: defaultdict(Peak))
    drained_at_s: float | None = None  # first sample after the replay with nothing open

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        connection.execute("PRAGMA query_only = ON")
        return connection

    def sample(self, phase: str) -> dict[str, Any] | None:
        at_s = round(time.monotonic() - self.started, 3)
        marks = ", ".join("?" * len(OPEN))
        try:
            connection = self.connect()
        except sqlite3.Error as exc:
            self.errors[f"connect: {exc}"] += 1
            return None
        try:
            rows = connection.execute(
                f"SELECT category, status, count(*) FROM notifications WHERE status IN ({marks}) "
                "GROUP BY category, status",
                OPEN,
            ).fetchall()
            pending_past, open_past = connection.execute(
                "SELECT coalesce(sum(status = 'PENDING'), 0), count(*) FROM notifications "
                f"WHERE status IN ({marks}) AND expires_at IS NOT NULL "
                "AND julianday(expires_at) < julianday('now')",
                OPEN,
            ).fetchone()
            one = connection.execute(
                f"SELECT count(*) AS n FROM notifications WHERE status IN ({marks}) "
                "GROUP BY recipient ORDER BY n DESC LIMIT 1",
                OPEN,
            ).fetchone()
            total_rows = connection.execute("SELECT count(*) FROM notifications").fetchone()[0]
        except sqlite3.Error as exc:  # e.g. the table not created yet
            self.errors[f"query: {exc}"] += 1
            return None
        finally:
            connection.close()
        by_category: Counter = Counter()
        by_status: Counter = Counter()
        for category, status, count in rows:
            by_category[category] += count
            by_status[status] += count
        open_total = sum(by_status.values())
        one_recipient = one[0] if one else 0
        record = {
            "t_s": at_s,
            "phase": phase,
            "rows": total_rows,
            "open": open_total,
            "open_by_category": dict(sorted(by_category.items())),
            "open_by_status": dict(sorted(by_status.items())),
            "max_open_one_recipient": one_recipient,
            "pending_past_expiry": pending_past,
            "open_past_expiry": open_past,
        }
        self.samples.append(record)
        self.peak_open.offer(open_total, at_s, phase)
        self.peak_pending_past_expiry.offer(pending_past, at_s, phase)
        self.peak_open_past_expiry.offer(open_past, at_s, phase)
        self.peak_one_recipient.offer(one_recipient, at_s, phase)
        for category, count in by_category.items():
            self.peak_by_category[category].offer(count, at_s, phase)
        for status, count in by_status.items():
            self.peak_by_status[status].offer(count, at_s, phase)
        if phase == "settle" and open_total == 0 and self.drained_at_s is None:
            self.drained_at_s = at_s
        return record

    def peaks(self) -> dict[str, Any]:
        def as_dict(peak: Peak) -> dict[str, Any]:
            return {"max": peak.value, "at_s": peak.at_s, "phase": peak.phase}

        return {
            "open": as_dict(self.peak_open),
            "open_by_category": {k: as_dict(v) for k, v in sorted(self.peak_by_category.items())},
            "open_by_status": {k: as_dict(v) for k, v in sorted(self.peak_by_status.items())},
            "pending_past_expiry": as_dict(self.peak_pending_past_expiry),
            "open_past_expiry": as_dict(self.peak_open_past_expiry),
            "max_open_one_recipient": as_dict(self.peak_one_recipient),
        }


# ------------------------------------------------------------------------------------------ final table


def final_table(db_path: Path) -> dict[str, Any]:
    """Everything about the outbox at the end, from the columns the old and new schemas share."""
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = connection.execute(f"SELECT {COLUMNS} FROM notifications").fetchall()
    finally:
        connection.close()
    now = datetime.now(UTC)
    counts: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    sent_late: Counter = Counter()
    open_rows: Counter = Counter()
    past_expiry: Counter = Counter()  # PENDING / FAILED with expires_at < now
    never_sent: dict[str, Counter] = defaultdict(Counter)
    recipients: dict[str, set[str]] = defaultdict(set)
    for _id, category, recipient, status, created, sent, expires, _next in rows:
        counts[category][status] += 1
        recipients[category].add(recipient)
        created_at, sent_at, expires_at = parse_time(created), parse_time(sent), parse_time(expires)
        if status in SENT and sent_at is not None and created_at is not None:
            latencies[category].append((sent_at - created_at).total_seconds())
            if expires_at is not None and sent_at > expires_at:
                sent_late[category] += 1
        if status in OPEN:
            open_rows[category] += 1
        if status in ("PENDING", "FAILED") and expires_at is not None and expires_at < now:
            past_expiry[category] += 1
        if (category.startswith("customer_") or category == "admin_alert") and status not in SENT:
            never_sent[category][status] += 1

    def latency(values: list[float]) -> dict[str, Any]:
        return {
            "n": len(values),
            "p50_s": percentile(values, 50),
            "p99_s": percentile(values, 99),
            "max_s": max(values) if values else None,
        }

    categories = sorted(counts)
    watched = sorted(c for c in categories if c.startswith("customer_") or c == "admin_alert")
    all_latencies = [value for values in latencies.values() for value in values]
    return {
        "read_at": now.isoformat(),
        "rows": len(rows),
        "counts": {c: dict(sorted(counts[c].items(), key=lambda kv: status_key(kv[0]))) for c in categories},
        "totals_by_status": dict(
            sorted(sum(counts.values(), Counter()).items(), key=lambda kv: status_key(kv[0]))
        ),
        "recipients": {c: len(recipients[c]) for c in categories},
        "latency": {c: latency(latencies[c]) for c in categories},
        "latency_all": latency(all_latencies),
        "sent_after_expiry": {c: sent_late[c] for c in categories},
        "still_open": {"total": sum(open_rows.values()), **{c: open_rows[c] for c in categories}},
        "pending_or_failed_past_expiry": {
            "total": sum(past_expiry.values()),
            **{c: past_expiry[c] for c in categories},
        },
        "customer_admin_never_sent": {
            c: {
                "rows": sum(counts[c].values()),
                "never_sent": sum(never_sent[c].values()),
                "by_status": dict(never_sent[c]),
            }
            for c in watched
        },
    }


def status_key(status: str) -> tuple[int, str]:
    return (STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER), status)
