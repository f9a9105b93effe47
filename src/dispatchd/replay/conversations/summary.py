"""A conversation replay's options and summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dispatchd.core.stats import percentile
from dispatchd.replay.conversations.plan import DEFAULT_REPLY_DELAY_S

# ---------------------------------------------------------------------------------------------------------
# Options and summary


@dataclass(frozen=True)
class ConversationReplayOptions:
    """``start``/``end``: naive local times of the trace, ``end`` exclusive; ``speed``: trace seconds per
    real second; ``reply_delay_s``: an agent's delay before answering, trace seconds (low, high);
    ``drain_timeout_s``: real seconds to wait at the end for every conversation to be assigned and
    answered. Raises ``ValueError`` on a bad value."""

    url: str
    webhook_secret: str
    admin_key: str
    trips_path: Path
    start: datetime | None = None
    end: datetime | None = None
    speed: float = 60.0
    agents: int = 10
    capacity: int = 10
    reply_delay_s: tuple[float, float] = DEFAULT_REPLY_DELAY_S
    presence_changes: bool = True
    seed: int = 7
    drain_timeout_s: float = 300.0
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("speed must be > 0")
        if self.agents < 1:
            raise ValueError("agents must be >= 1")
        if not 1 <= self.capacity <= 1000:
            raise ValueError("capacity must be within [1, 1000]")
        low, high = self.reply_delay_s
        if low <= 0 or high < low:
            raise ValueError("agent reply delay: need 0 < low <= high")
        if not self.webhook_secret:
            raise ValueError("the webhook secret (the server's DISPATCHD_WHATSAPP_APP_SECRET) is required")
        if not self.admin_key:
            raise ValueError("an admin key is required (agents and their keys are created with it)")
        if self.drain_timeout_s < 0 or self.poll_s <= 0:
            raise ValueError("drain_timeout_s must be >= 0 and poll_s > 0")


def _quantiles(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    return percentile(values, 50), percentile(values, 95), percentile(values, 99)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


@dataclass
class ConversationReplaySummary:
    """What a run found (see the module doc for each figure). ``ok`` when nothing was lost or refused,
    nothing double-assigned, no customer had two open conversations and the run was not aborted."""

    customers: int = 0
    messages_planned: int = 0
    messages_accepted: int = 0
    messages_refused: int = 0
    duplicates_acknowledged: int = 0
    messages_stored: int = 0
    messages_lost: int = 0
    stored_twice: int = 0
    conversations: int = 0
    conversations_open_at_end: dict[str, int] = field(default_factory=dict)
    time_to_assign_s: list[float] = field(default_factory=list)
    time_to_first_reply_s: list[float] = field(default_factory=list)
    webhook_answer_s: list[float] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    pending_peak_sampled: int = 0
    assignments_per_agent: dict[str, int] = field(default_factory=dict)
    agent_peak_load: int = 0
    capacity: int = 0
    double_assigned: int = 0
    violations: list[tuple[str, str]] = field(default_factory=list)
    customers_with_two_open: int = 0
    replies: int = 0
    replies_refused: int = 0
    closes: int = 0
    presence_changes: int = 0
    http_errors: Counter[str] = field(default_factory=Counter)
    speed: float = 1.0
    wall_s: float = 0.0
    aborted: str | None = None

    @property
    def spread(self) -> int | None:
        counts = list(self.assignments_per_agent.values())
        return max(counts) - min(counts) if counts else None

    @property
    def ok(self) -> bool:
        return (
            self.aborted is None
            and self.messages_lost == 0
            and self.messages_refused == 0
            and self.double_assigned == 0
            and self.customers_with_two_open == 0
        )

    def render(self, console: Console) -> None:
        table = Table(title="replay-conversations", show_header=False)
        table.add_column("figure")
        table.add_column("value")

        def row(name: str, value: object, good: bool | None = None) -> None:
            text = str(value)
            if good is not None:
                text = f"[{'green' if good else 'red'}]{text}[/]"
            table.add_row(name, text)

        def triple(values: Sequence[float], scale: float = 1.0) -> str:
            p50, p95, p99 = _quantiles(values)
            scaled = [None if v is None else v * scale for v in (p50, p95, p99)]
            return " / ".join(_seconds(v) for v in scaled)

        row("customers / messages planned", f"{self.customers} / {self.messages_planned}")
        row(
            "messages acknowledged by the server (200)",
            f"{self.messages_accepted} ({self.duplicates_acknowledged} re-deliveries seen as duplicates)",
        )
        row("messages never acknowledged (must be 0)", self.messages_refused, self.messages_refused == 0)
        row("messages stored in a thread", f"{self.messages_stored} (twice: {self.stored_twice})")
        row(
            "lost messages: acknowledged, in no thread (must be 0)",
            self.messages_lost,
            self.messages_lost == 0,
        )
        row("conversations", f"{self.conversations}; open at the end {dict(self.conversations_open_at_end)}")
        row(
            "time to assign p50 / p95 / p99 (real; 0 = by the message that opened it)",
            triple(self.time_to_assign_s),
        )
        row(
            "time to first reply p50 / p95 / p99 (real)",
            f"{triple(self.time_to_first_reply_s)} "
            f"(trace time: {triple(self.time_to_first_reply_s, self.speed)})",
        )
        if self.stats is not None:
            assign, reply = (
                self.stats.get("time_to_assign_s") or {},
                self.stats.get("time_to_first_reply_s") or {},
            )
            row(
                "GET /v1/dispatcher/stats p50 / p95",
                f"assign {_seconds(assign.get('p50'))} / {_seconds(assign.get('p95'))}, "
                f"first reply {_seconds(reply.get('p50'))} / {_seconds(reply.get('p95'))}",
            )
            pending = self.stats.get("pending") or {}
            row("pending peak (stats, from the events)", pending.get("peak", "-"))
            reasons = (self.stats.get("reassignments") or {}).get("by_reason") or {}
            row("reassignments by reason", ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "none")
        row("pending peak (sampled each second, ≤ 1,000)", self.pending_peak_sampled)
        counts = sorted(self.assignments_per_agent.values())
        row(
            "assignments per agent min / max (max − min)",
            f"{counts[0]} / {counts[-1]} ({self.spread})" if counts else "-",
        )
        row(
            "most conversations one agent held at once / capacity",
            f"{self.agent_peak_load} / {self.capacity}",
            self.agent_peak_load <= self.capacity,
        )
        row("double-assigned conversations (must be 0)", self.double_assigned, self.double_assigned == 0)
        row(
            "customers with two open conversations (must be 0)",
            self.customers_with_two_open,
            self.customers_with_two_open == 0,
        )
        row("agent replies / refused (moved or closed first)", f"{self.replies} / {self.replies_refused}")
        row("closes by agents / presence changes", f"{self.closes} / {self.presence_changes}")
        row("webhook answer p50 / p95 / p99", triple(self.webhook_answer_s))
        if self.http_errors:
            row("HTTP errors", ", ".join(f"{k}: {v}" for k, v in self.http_errors.most_common(8)))
        row("wall time", f"{self.wall_s:.1f} s at ×{self.speed:g}")
        if self.aborted:
            row("aborted", self.aborted, False)
        console.print(table)
        for conversation, what in self.violations[:10]:
            console.print(f"[red]{conversation}: {what}[/]")
