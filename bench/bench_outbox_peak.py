"""The outbox (``notifications`` table) at a real peak: backlog, staleness and latency during a replay.

What is measured:

- a ``dispatchd serve`` process (this checkout's ``src`` first on ``PYTHONPATH``, its own process group, cwd
  a fresh temp dir so no ``.env`` is read) on a fresh SQLite file, channel ``log``, the shipped pacing
  (``DISPATCHD_RECIPIENT_INTERVAL_S=6``, ``--recipient-interval``), everything else at its default;
- ``dispatchd replay`` against it (its own process): by default the shipped trace's busiest 30 minutes
  (2014-04-30 18:22 → 18:52, 110 pickups) at ``--speed 5`` with ``--drivers 150``, seed 7;
- while the replay runs, and then for ``--settle`` seconds (60) with the server still up and the replay
  gone, every ``--interval`` (1 s) the SQLite file is read directly (``sqlite3``, ``mode=ro``; WAL, so the
  reader never blocks the server): open rows (status PENDING / SENDING / FAILED) in total, by category and
  by status, the largest number of open rows held for one recipient, and PENDING rows (and all open rows)
  whose ``expires_at`` has passed. The peak (maximum) of each is kept, with the time it was seen;
- at the end, the whole table: rows per category × status; per category the written → sent latency
  (``sent_at - created_at``, rows SENT / DELIVERED / READ) p50 / p99 / max; rows sent after their
  ``expires_at``; rows still open; PENDING / FAILED rows past ``expires_at``; for ``customer_*`` and
  ``admin_alert``, rows never sent (status not SENT / DELIVERED / READ), by status;
- the replay's own summary table (time to assign p50 / p95 / p99, assigned, timed out, …), parsed from its
  stdout, and its exit code.

Only the columns ``id, category, recipient, status, created_at, sent_at, expires_at, next_attempt_at`` are
read, so the same script runs on the outbox before and after a schema change. Times are SQLAlchemy's
SQLite text (naive UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``; ``UTCDateTime``); an explicit offset is honoured.
Percentiles: linear interpolation between closest ranks (numpy's default).

Usage (from a checkout root, with that checkout's virtualenv):
``python -m bench.bench_outbox_peak [--from 2014-04-30T18:22] [--to 2014-04-30T18:52] [--speed 5]
[--drivers 150] [--seed 7] [--settle 60] [--interval 1] [--recipient-interval 6] [--drain-timeout S]
[--trips PATH] [--workdir DIR] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import free_port, machine

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "dk_bench_outbox_peak_admin_0123456789"
APP_SECRET = "bench-outbox-peak-app-secret"
PAIR_INTERVAL_S = 6.0  # Meta's pair rate limit, enforced by the fake in --fleet whatsapp
OPEN = ("PENDING", "SENDING", "FAILED")
SENT = ("SENT", "DELIVERED", "READ")
STATUS_ORDER = (
    "PENDING", "SENDING", "FAILED", "SENT", "DELIVERED", "READ", "FAILED_PERMANENT", "CANCELLED", "EXPIRED"
)  # fmt: skip
COLUMNS = "id, category, recipient, status, created_at, sent_at, expires_at, next_attempt_at"


# ----------------------------------------------------------------------------------------------- helpers


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


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any DISPATCHD_* setting, this checkout's code first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHD_")}
    path = [str(ROOT / "src"), str(ROOT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return {**env, **extra}


def stop(process: subprocess.Popen, grace_s: float = 20.0) -> str:
    """SIGINT (graceful), then SIGTERM, then SIGKILL the process group we started; say which ended it."""
    if process.poll() is not None:
        return f"already exited ({process.returncode})"
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            return f"{signal.Signals(sig).name} → exit {process.returncode}"
        except subprocess.TimeoutExpired:
            continue
    return f"exit {process.poll()}"


def get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


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
        "counts": {c: dict(sorted(counts[c].items(), key=lambda kv: _status_key(kv[0]))) for c in categories},
        "totals_by_status": dict(
            sorted(sum(counts.values(), Counter()).items(), key=lambda kv: _status_key(kv[0]))
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


def _status_key(status: str) -> tuple[int, str]:
    return (STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER), status)


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


# ---------------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, folder: Path, console: Console) -> dict[str, Any]:
    db_path = folder / "outbox.db"
    server_log, replay_log = folder / "server.log", folder / "replay.out"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_settings = {
        "DISPATCHD_DATABASE_URL": f"sqlite+aiosqlite:///{db_path}",
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_NOTIFICATION_CHANNEL": "log",
        "DISPATCHD_RECIPIENT_INTERVAL_S": f"{args.recipient_interval:g}",
        "DISPATCHD_LOG_LEVEL": "WARNING",
        "DISPATCHD_LOG_JSON": "true",
    }
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        fake_url = None
        if args.fleet == "whatsapp":
            fake_port = free_port()
            fake_url = f"http://127.0.0.1:{fake_port}"
            fake_out = stack.enter_context((folder / "fake.log").open("w"))
            fake = subprocess.Popen(
                [sys.executable, "-m", "dispatchd.testing.fake_whatsapp", "--port", str(fake_port),
                 "--pair-interval-s", f"{PAIR_INTERVAL_S:g}"],
                cwd=folder, env=clean_env(), stdout=fake_out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            stack.callback(lambda: stop(fake, grace_s=5))
            deadline = time.monotonic() + 30
            while not get_ok(f"{fake_url}/stats"):
                if fake.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the fake WhatsApp did not start:\n{tail(folder / 'fake.log')}")
                time.sleep(0.1)
            server_settings.update(
                DISPATCHD_NOTIFICATION_CHANNEL="whatsapp_cloud",
                DISPATCHD_WHATSAPP_API_BASE_URL=f"{fake_url}/v21.0",
                DISPATCHD_WHATSAPP_ACCESS_TOKEN="bench-token",
                DISPATCHD_WHATSAPP_PHONE_NUMBER_ID="1234567890",
                DISPATCHD_WHATSAPP_APP_SECRET=APP_SECRET,
            )
        shown = {
            **server_settings,
            "DISPATCHD_ADMIN_API_KEY": "(bench key)",
            **({"DISPATCHD_WHATSAPP_APP_SECRET": "(bench secret)"} if fake_url else {}),
        }
        result["server_settings"] = shown
        out = stack.enter_context(server_log.open("w"))
        server = subprocess.Popen(
            [sys.executable, "-m", "dispatchd", "serve", "--port", str(port)],
            cwd=folder,
            env=clean_env(**server_settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(lambda: result.setdefault("server_stopped", stop(server)))
        deadline = time.monotonic() + 120
        while not get_ok(f"{base}/health"):
            if server.poll() is not None:
                raise RuntimeError(f"dispatchd serve exited ({server.returncode}):\n{tail(server_log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dispatchd serve not healthy after 120 s:\n{tail(server_log)}")
            time.sleep(0.1)
        ready_deadline = time.monotonic() + 30
        while not get_ok(f"{base}/ready") and time.monotonic() < ready_deadline:
            time.sleep(0.2)
        console.print(f"server up at {base} (pid {server.pid}); database {db_path}")

        command = [
            sys.executable, "-m", "dispatchd", "replay", "--url", base,
            "--from", args.start, "--to", args.end, "--speed", f"{args.speed:g}",
            "--drivers", str(args.drivers), "--seed", str(args.seed),
        ]  # fmt: skip
        if fake_url:
            command += [
                "--fleet",
                "whatsapp",
                "--whatsapp-fake-url",
                fake_url,
                "--webhook-secret",
                APP_SECRET,
            ]
        if args.drain_timeout is not None:
            command += ["--drain-timeout", f"{args.drain_timeout:g}"]
        if args.trips:
            command.append(str(args.trips))
        result["replay_command"] = " ".join(command[1:])
        replay_env = clean_env(DISPATCHD_API_KEY=ADMIN_KEY, COLUMNS="120", NO_COLOR="1", TERM="dumb")
        replay_out = stack.enter_context(replay_log.open("w"))
        started = time.monotonic()
        replay = subprocess.Popen(
            command, cwd=folder, env=replay_env, stdout=replay_out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        stack.callback(lambda: replay.poll() is None and stop(replay, grace_s=5))
        sampler = Sampler(db_path, started)
        console.print(f"replay running (pid {replay.pid}); sampling the outbox every {args.interval:g} s")
        next_at = started
        while replay.poll() is None:
            sampler.sample("replay")
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        replay_s = time.monotonic() - started
        console.print(f"replay exited ({replay.returncode}) after {replay_s:.1f} s; settle {args.settle:g} s")
        settle_until = time.monotonic() + args.settle
        next_at = time.monotonic()
        while time.monotonic() < settle_until:
            sampler.sample("settle")
            if server.poll() is not None:
                raise RuntimeError(f"dispatchd serve died while settling:\n{tail(server_log)}")
            next_at += args.interval
            time.sleep(max(0.0, min(next_at, settle_until) - time.monotonic()))
        sampler.sample("settle")
        final = final_table(db_path)  # read with the server still up: what it holds after the settle
        if fake_url:
            with urllib.request.urlopen(f"{fake_url}/stats", timeout=10) as answer:
                stats = json.loads(answer.read())
            result["fake_whatsapp"] = {
                key: stats.get(key) for key in ("calls", "delivered", "unique", "failed", "pair_limit_hits")
            }

    replay_text = replay_log.read_text(errors="replace")
    levels: Counter = Counter()
    events: Counter = Counter()
    for line in server_log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            levels["(not JSON)"] += 1
            continue
        if isinstance(entry, dict):
            levels[str(entry.get("level", "?"))] += 1
            events[str(entry.get("event", "?"))[:80]] += 1
    result.update(
        {
            "replay_exit_code": replay.returncode,
            "replay_wall_s": round(replay_s, 2),
            "replay_summary": parse_replay_summary(replay_text),
            "replay_stdout_tail": replay_text[-6000:],
            "settle_s": args.settle,
            "drained_at_s": sampler.drained_at_s,
            "drained_after_replay_s": (
                None if sampler.drained_at_s is None else round(sampler.drained_at_s - replay_s, 2)
            ),
            "peaks": sampler.peaks(),
            "sample_errors": dict(sampler.errors),
            "samples": sampler.samples,
            "final": final,
            "server_log": {"lines_by_level": dict(levels), "top_events": dict(events.most_common(15))},
        }
    )
    return result


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

    statuses = sorted(final["totals_by_status"], key=_status_key)
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--from", dest="start", default="2014-04-30T18:22", help="first pickup (trace time)")
    parser.add_argument("--to", dest="end", default="2014-04-30T18:52", help="pickups before this")
    parser.add_argument("--speed", type=float, default=5.0, help="trace seconds per real second")
    parser.add_argument("--drivers", type=int, default=150, help="simulated drivers")
    parser.add_argument("--seed", type=int, default=7, help="the replay's random seed")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds sampled after the replay exits")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument(
        "--recipient-interval", type=float, default=6.0, help="DISPATCHD_RECIPIENT_INTERVAL_S of the server"
    )
    parser.add_argument(
        "--fleet",
        choices=("events", "whatsapp"),
        default="events",
        help="events: log channel, drivers read the event log; whatsapp: whatsapp_cloud to the fake "
        "WhatsApp (pair limit 6 s), drivers see only what the outbox sent and tap signed webhooks",
    )
    parser.add_argument("--drain-timeout", type=float, help="the replay's --drain-timeout (its default)")
    parser.add_argument("--trips", type=Path, help="trips CSV (default: the shipped NYC day)")
    parser.add_argument("--workdir", type=Path, help="keep the database and logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write every figure (and the samples) to this file")
    args = parser.parse_args()

    interactive = sys.stdout.isatty()
    console = Console(width=None if interactive else 150, no_color=not interactive)
    channel = "channel whatsapp_cloud → fake WhatsApp" if args.fleet == "whatsapp" else "channel log"
    scenario = (
        f"replay {args.start} → {args.end} at ×{args.speed:g}, {args.drivers} drivers, seed {args.seed}; "
        f"SQLite, fleet {args.fleet} ({channel}), "
        f"recipient interval {args.recipient_interval:g} s; settle {args.settle:g} s"
    )
    load_before = load_average()
    with ExitStack() as stack:
        if args.workdir:
            folder = args.workdir.resolve()
            folder.mkdir(parents=True, exist_ok=True)
            if (folder / "outbox.db").exists():
                parser.error(f"{folder} already holds outbox.db: use a fresh --workdir")
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-outbox-peak-")))
        result = run(args, folder, console)
    status = git("status", "--porcelain", "--untracked-files=no")
    result["meta"] = {
        "benchmark": "bench.bench_outbox_peak",
        "scenario": scenario,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_average(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": (
            f"{ROOT} @ {git('rev-parse', '--short', 'HEAD') or '?'}"
            + ("" if not status else " (tracked files modified)")
        ),
        "python": sys.executable,
    }
    report(result, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        console.print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
