"""What ``bench.bench_outbox_peak`` prints: the replay's own summary parsed from its stdout, then the
outbox's figures as tables (category × status, written → sent, backlog peaks, customer and admin messages
never sent)."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.outbox_peak_sampler import status_key

# ------------------------------------------------------------------------------------- replay's summary

_ROW = re.compile(r"^\s*[│|┃]\s*(?P<name>[^│|┃]*?)\s*[│|┃]\s*(?P<value>[^│|┃]*?)\s*[│|┃]\s*$")


def parse_replay_summary(text: str) -> dict[str, Any]:
    """The rows of ``dispatchd replay``'s summary table (metric │ value), and of its two extra tables under
    ``responses_by_action`` and ``http_errors``."""
    found: dict[str, Any] = {}
    section = found
    for line in text.splitlines():
        title = line.strip()
        if title in ("responses by action", "HTTP errors"):
            section = found.setdefault(title.lower().replace(" ", "_"), {})
            continue
        match = _ROW.match(line)
        if not match or not match["name"] or match["name"] in ("metric", "what"):
            continue
        raw = match["value"]
        value: Any = raw
        if re.fullmatch(r"-?\d+", raw):
            value = int(raw)
        elif re.fullmatch(r"-?\d+(\.\d+)? s", raw):
            value = float(raw[:-2])
        elif raw in ("—", "-"):
            value = None
        section[match["name"]] = value
    return found


# ------------------------------------------------------------------------------------------------ report


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def report(result: dict[str, Any], console: Console) -> None:
    meta, final, peaks = result["meta"], result["final"], result["peaks"]
    console.print()
    console.print(f"[bold]outbox at a real peak[/] — {meta['scenario']}")
    console.print(f"machine: {meta['machine']}")
    console.print(
        f"load average (1, 5, 15 min) before: {meta['load_before']}, after: {meta['load_after']} "
        "(server, replay and sampler share the machine)"
    )
    console.print(f"code: {meta['code']}")
    if result.get("fake_whatsapp"):
        console.print(f"fake WhatsApp: {result['fake_whatsapp']}")
    console.print(
        f"replay: exit {result['replay_exit_code']}, {result['replay_wall_s']:.1f} s wall; "
        f"settle {result['settle_s']:g} s; server stopped: {result.get('server_stopped', '?')}"
    )

    summary = result["replay_summary"]
    replay = Table(title="replay (its own summary)", show_header=False)
    replay.add_column("metric")
    replay.add_column("value", justify="right")
    for name in (
        "trips replayed", "drivers", "bookings", "assigned", "timed out", "still searching",
        "time to assign p50", "time to assign p95", "time to assign p99", "double assignments",
        "drivers double-booked", "notifications written", "offers sent", "offers timed out", "elapsed",
    ):  # fmt: skip
        value = summary.get(name)
        shown = "-" if value is None else (f"{value:.2f} s" if isinstance(value, float) else str(value))
        replay.add_row(name, shown)
    console.print(replay)
    for name in ("responses_by_action", "http_errors"):
        if summary.get(name):
            console.print(
                f"replay {name.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in summary[name].items())
            )

    statuses = sorted(final["totals_by_status"], key=status_key)
    counts = Table(title=f"notifications at the end: category × status ({final['rows']} rows)")
    counts.add_column("category")
    for status in statuses:
        counts.add_column(status, justify="right")
    counts.add_column("total", justify="right")
    for category, by_status in final["counts"].items():
        counts.add_row(category, *(str(by_status.get(s, 0)) for s in statuses), str(sum(by_status.values())))
    counts.add_row(
        "[bold]all[/]", *(str(final["totals_by_status"][s]) for s in statuses), f"[bold]{final['rows']}[/]"
    )
    console.print(counts)

    latency = Table(title="written → sent (sent_at - created_at), rows SENT / DELIVERED / READ")
    for column in ("category", "sent", "p50", "p99", "max", "sent after expiry", "open", "peak open"):
        latency.add_column(column, justify="left" if column == "category" else "right")
    for category, figures in final["latency"].items():
        peak = peaks["open_by_category"].get(category, {})
        latency.add_row(
            category,
            str(figures["n"]),
            fmt_s(figures["p50_s"]),
            fmt_s(figures["p99_s"]),
            fmt_s(figures["max_s"]),
            str(final["sent_after_expiry"][category]),
            str(final["still_open"][category]),
            f"{peak.get('max', 0)}" + (f" @ {peak['at_s']:.0f} s" if peak.get("at_s") is not None else ""),
        )
    everything = final["latency_all"]
    latency.add_row(
        "[bold]all[/]", str(everything["n"]), fmt_s(everything["p50_s"]), fmt_s(everything["p99_s"]),
        fmt_s(everything["max_s"]), str(sum(final["sent_after_expiry"].values())),
        str(final["still_open"]["total"]), str(peaks["open"]["max"]),
    )  # fmt: skip
    console.print(latency)

    backlog = Table(title="backlog (sampled every second, t from the replay's start)", show_header=False)
    backlog.add_column("what")
    backlog.add_column("value", justify="right")

    def peak_text(peak: dict[str, Any]) -> str:
        where = "" if peak["at_s"] is None else f"  (t = {peak['at_s']:.0f} s, {peak['phase']})"
        return f"{peak['max']}{where}"

    backlog.add_row("peak open rows (PENDING + SENDING + FAILED)", peak_text(peaks["open"]))
    for status, peak in peaks["open_by_status"].items():
        backlog.add_row(f"  peak {status}", peak_text(peak))
    backlog.add_row("peak PENDING rows past expires_at", peak_text(peaks["pending_past_expiry"]))
    backlog.add_row("peak open rows past expires_at", peak_text(peaks["open_past_expiry"]))
    backlog.add_row("peak open rows for one recipient", peak_text(peaks["max_open_one_recipient"]))
    drained = result["drained_after_replay_s"]
    backlog.add_row(
        "backlog empty", "never within the settle" if drained is None else f"{drained:.0f} s after the replay"
    )
    backlog.add_row("still open at the end", str(final["still_open"]["total"]))
    backlog.add_row(
        "PENDING / FAILED past expires_at at the end", str(final["pending_or_failed_past_expiry"]["total"])
    )
    backlog.add_row("samples", f"{len(result['samples'])} (errors: {sum(result['sample_errors'].values())})")
    console.print(backlog)

    never = Table(title="customer_* and admin_alert: never sent (status not SENT / DELIVERED / READ)")
    for column in ("category", "rows", "never sent", "by status"):
        never.add_column(column, justify="left" if column in ("category", "by status") else "right")
    for category, figures in final["customer_admin_never_sent"].items():
        never.add_row(
            category,
            str(figures["rows"]),
            str(figures["never_sent"]),
            ", ".join(f"{s} {n}" for s, n in sorted(figures["by_status"].items())) or "-",
        )
    console.print(never)
    if result["sample_errors"]:
        console.print(f"sample errors: {result['sample_errors']}")
    logs = result["server_log"]["lines_by_level"]
    if logs:
        console.print(f"server log lines by level: {logs}")
