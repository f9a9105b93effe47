"""One run of ``bench.bench_notifications`` (:class:`Outcome`: what the fake counted, and the figures
derived from it) and the markdown row it prints."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field


@dataclass
class Outcome:
    system: str
    scenario: str
    messages: int
    started: float  # time.time() of the first enqueue
    ids: list[str]
    stats: dict = field(default_factory=dict)
    finished: bool = False
    in_flight_at_kill: int | None = None
    #: the system's server processes' CPU seconds (user + system, whole process tree) from the first
    #: enqueue to the end of the run (:class:`bench.notifications_procs.CpuAcrossRestarts`)
    cpu_s: float | None = None
    #: server CPU ms per message while 10 % → 70 % of the ids were delivered (the sustained window)
    window_cpu_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return self.stats.get("counts", {})

    @property
    def lost(self) -> int:
        return sum(1 for nid in self.ids if not self.counts.get(nid))

    @property
    def lost_detail(self) -> str:
        """How many calls the fake saw for the lost ids (0: never sent; more: only failed calls)."""
        attempts = self.stats.get("attempts", {})
        calls = sorted(attempts.get(nid, 0) for nid in self.ids if not self.counts.get(nid))
        return f"lost ids got {', '.join(map(str, calls))} call(s)" if calls else ""

    @property
    def duplicates(self) -> int:
        return sum(max(0, self.counts.get(nid, 0) - 1) for nid in self.ids)

    @property
    def cpu_ms_per_message(self) -> float | None:
        """Server CPU milliseconds per message delivered (distinct ids the fake accepted)."""
        delivered = len([nid for nid in self.ids if self.counts.get(nid)])
        return None if self.cpu_s is None or not delivered else self.cpu_s * 1000 / delivered

    @property
    def end_to_end(self) -> float | None:
        last = self.stats.get("last_new_at")
        return None if last is None else last - self.started

    @property
    def completion_rate(self) -> float | None:
        first, last = self.stats.get("first_call_at"), self.stats.get("last_new_at")
        if first is None or last is None or last <= first or self.lost:
            return None
        return self.messages / (last - first)

    def delivered_by(self, share: float) -> float | None:
        """Seconds from the fake's first call until ``share`` of the ids were delivered."""
        times = sorted(self.stats.get("first_delivery_times", []))
        needed = max(1, round(share * self.messages))
        if len(times) < needed or self.stats.get("first_call_at") is None:
            return None
        return times[needed - 1] - self.stats["first_call_at"]

    @property
    def sustained_rate(self) -> float | None:
        times = sorted(self.stats.get("first_delivery_times", []))
        low, high = int(0.1 * self.messages), int(0.7 * self.messages) - 1
        if len(times) <= high or times[high] <= times[low]:
            return None
        return (high - low) / (times[high] - times[low])


# -------------------------------------------------------------------------------------------------- report


def celery_pool(args: argparse.Namespace) -> str:
    return f"threads × {args.concurrency}" if args.celery_pool == "threads" else f"prefork × {args.processes}"


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def scenario(kill: bool, args: argparse.Namespace) -> str:
    return f"SIGKILL at {args.kill_at:.0%}, restart" if kill else "undisturbed"


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}/s"


def fmt_cpu(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f} ms"


def row(o: Outcome) -> str:
    calls = o.stats.get("calls", 0)
    failed = o.stats.get("failed", 0)
    lost = f"{o.lost} {'✅' if o.lost == 0 else '❌'}"
    reached = " / ".join(
        "-" if (t := o.delivered_by(share)) is None else f"{t:.2f}" for share in (0.8, 0.99, 1.0)
    )
    flight = "" if o.in_flight_at_kill is None else f"{o.in_flight_at_kill} in flight at the kill"
    notes = "; ".join(
        ([flight] if flight else [])
        + o.notes
        + ([o.lost_detail] if o.lost else [])
        + ([] if o.finished else ["NOT FINISHED: --timeout reached"])
    )
    return (
        f"| {o.system} | {o.scenario} | {o.messages:,} | {fmt_s(o.end_to_end)} | "
        f"{fmt_rate(o.completion_rate)} | {fmt_rate(o.sustained_rate)} | {reached} | "
        f"{calls:,} / {failed:,} | {fmt_cpu(o.cpu_ms_per_message)} / {fmt_cpu(o.window_cpu_ms)} | "
        f"{lost} | {o.duplicates} | {notes} |"
    )


def ratio(ours: float | None, theirs: float | None, goal: float | None = 2.0) -> str:
    """``ours ÷ theirs`` as ``1.23×``, marked against ``goal`` when one is given."""
    if not ours or not theirs:
        return "-"
    value = ours / theirs
    return f"{value:.2f}×" + ("" if goal is None else f" {'✅' if value >= goal else '❌'}")
