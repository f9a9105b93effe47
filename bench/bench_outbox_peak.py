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
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import free_port, machine
from bench.outbox_peak_procs import ROOT, clean_env, get_ok, git, load_average, stop, tail
from bench.outbox_peak_report import parse_replay_summary, report
from bench.outbox_peak_sampler import Sampler, final_table

ADMIN_KEY = "dk_bench_outbox_peak_admin_0123456789"
APP_SECRET = "bench-outbox-peak-app-secret"
PAIR_INTERVAL_S = 6.0  # Meta's pair rate limit, enforced by the fake in --fleet whatsapp


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
