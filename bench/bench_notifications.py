"""Notification delivery: dispatchd's outbox worker against the seed's Celery + Redis, same fake WhatsApp.

What is measured (issue text: "sustained deliveries per second to a local fake WhatsApp server that fails
20 % of calls transiently, and the same job done by Celery + Redis (the seed's stack) in the same run.
Goal: at least 2x Celery's rate, 0 lost; report duplicates after a worker kill for both."):

- the fake: ``bench/fake_whatsapp.py`` in its own process, ``--fail-rate`` (0.2) of calls answered 503
  with Meta error 131000 (TEMPORARY), ``--latency-ms`` (5) per answer; it counts deliveries per
  notification id, so lost and duplicated messages are counted where they land;
- dispatchd: N rows written to the outbox in one transaction (``outbox.enqueue``, category
  ``driver_offer`` so a failed send is retried after 2 s × 2^(n-1) ±20 %, capped at 10 s; the
  informational policy waits 30 min; ``expires_at`` one day ahead), delivered by a ``dispatchd serve``
  process on PostgreSQL: channel ``whatsapp_cloud``, ``DISPATCHD_RECIPIENT_INTERVAL_S=0`` (distinct
  phones anyway), ``DISPATCHD_CHANNEL_RATE=""`` (no drain limit), ``DISPATCHD_DELIVERY_CONCURRENCY``
  = ``--concurrency`` (32), lease 5 s; the code as shipped, nothing patched (circuit breaker included);
- Celery: ``bench/celery_baseline.py``, one task per message with ``.delay()``, ``acks_late=True``,
  ``autoretry_for`` with a 0.05 s countdown, a worker ``celery worker -P prefork --concurrency 16``
  (its best rate on this 2-core machine: 16 processes ≈ 430/s sustained, 8 ≈ 380/s, 4 and 2 ≈ 285/s
  and 160/s, ``-P threads --concurrency 32`` ≈ 280/s; ``--celery-pool threads`` uses ``--concurrency``
  threads), Redis db 15 (flushed before and after), visibility timeout 5 s, restore sweep every second.

Each system runs twice: undisturbed, then killed with SIGKILL once ``--kill-at`` (40 %) of the ids have
been delivered and restarted at once. A run ends when the system holds nothing more (dispatchd: no
PENDING / SENDING / FAILED row; Celery: queue and unacked set empty, and every id delivered or 3 s
without anything held), or at ``--timeout``.

Reported per run: end-to-end time (first enqueue → last id first delivered); the completion rate (N ÷
time from the fake's first call to the last id: includes each system's retry tail, and dispatchd's
time-critical policy waits 2 s, 4 s, 8 s, 10 s between attempts where the Celery task waits 0.05 s);
the sustained rate (ids first delivered between the 10th and the 70th percentile ÷ the time they took:
the rate while the backlog drains, without start-up and without the ~20 % of ids whose first call
failed and whose delivery therefore depends on the retry delay); when (after the fake's first call)
80 %, 99 % and all ids had been delivered; calls and 503s; lost (ids the fake never accepted);
duplicates (acceptances beyond the first); and what the kill left in flight (dispatchd: rows SENDING;
Celery: messages in Redis's unacked set).

Usage: ``python -m bench.bench_notifications [--quick] [--messages N] [--fail-rate 0.2]
[--latency-ms 5] [--concurrency 32] [--celery-pool prefork|threads] [--processes 16] [--kill-at 0.4]
[--timeout S] [--systems both|dispatchd|celery] [--skip-kill] [--profile SVG]``
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import delete, func, select

from bench.common import free_port, fresh_database, machine, postgres_version
from bench.notifications_celery import REDIS_URL, run_celery
from bench.notifications_outcome import Outcome, celery_pool, load, ratio, row, scenario
from bench.notifications_procs import (
    PHONE_NUMBER_ID,
    CpuAcrossRestarts,
    http_ok,
    run_folder,
    shutdown,
    sigkill,
    spawn,
    wait_for,
)
from dispatchd.core.db import Database
from dispatchd.core.logging import configure_logging
from dispatchd.notifications import outbox
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus
from dispatchd.notifications.outbox import Message

ADMIN_KEY = "dk_bench_admin_key_0123456789abcdef"
LEASE_S = 5  # dispatchd's lease = Celery's visibility timeout (bench/celery_baseline.py)


# ----------------------------------------------------------------------------------------------- dispatchd


class DispatchdWorker:
    """dispatchd as in production on PostgreSQL: ``serve --no-delivery`` (the API; its sweeper expires
    rows) beside ``worker --processes N`` (the delivery); with ``processes`` 0, one ``serve`` that also
    delivers (the layout before ``dispatchd worker``). :meth:`start` (re)starts what delivers."""

    def __init__(self, database_url: str, fake_url: str, args: argparse.Namespace, logs: Path) -> None:
        self.env = {
            "DISPATCHD_DATABASE_URL": database_url,
            "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
            "DISPATCHD_LOG_LEVEL": "WARNING",
            "DISPATCHD_LOG_JSON": "true",
            "DISPATCHD_NOTIFICATION_CHANNEL": "whatsapp_cloud",
            "DISPATCHD_WHATSAPP_API_BASE_URL": f"{fake_url}/v21.0",
            "DISPATCHD_WHATSAPP_ACCESS_TOKEN": "fake-token",
            "DISPATCHD_WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID,
            "DISPATCHD_WHATSAPP_HTTP2": "prior_knowledge" if args.provider_http == "2" else "off",
            "DISPATCHD_RECIPIENT_INTERVAL_S": "0",
            "DISPATCHD_CHANNEL_RATE": "",
            "DISPATCHD_DELIVERY_CONCURRENCY": str(args.concurrency),
            "DISPATCHD_DELIVERY_LEASE_S": str(LEASE_S),
        }
        self.processes = args.worker_processes
        self.logs = logs
        self.server: subprocess.Popen | None = None
        self.process: subprocess.Popen | None = None  # what delivers: the worker, or serve when processes=0
        self.started = 0

    @property
    def pids(self) -> list[int]:
        """The process groups whose CPU counts: the server and the worker (and their children)."""
        return sorted({p.pid for p in (self.server, self.process) if p is not None and p.poll() is None})

    async def start(self) -> None:
        self.started += 1
        if not self.processes and self.server is not None and self.server.poll() is not None:
            self.server = None  # the one serve was killed: start it again
        if self.server is None:
            port = free_port()
            log = self.logs / "dispatchd-serve.log"
            command = [sys.executable, "-m", "dispatchd", "serve", "--port", str(port)]
            if self.processes:
                command.append("--no-delivery")
            self.server = spawn(command, log, self.env)
            await wait_for(
                lambda: http_ok(f"http://127.0.0.1:{port}/ready"), 60, "dispatchd serve", self.server, log
            )
            if not self.processes:
                self.process = self.server
                return
        metrics = free_ports(self.processes)
        log = self.logs / f"dispatchd-worker-{self.started}.log"
        command = [sys.executable, "-m", "dispatchd", "worker", "--processes", str(self.processes),
                   "--metrics-port", str(metrics)]  # fmt: skip
        self.process = spawn(command, log, self.env)
        for index in range(self.processes):
            url = f"http://127.0.0.1:{metrics + index}/metrics"
            await wait_for(lambda url=url: http_ok(url), 60, "dispatchd worker", self.process, log)

    def circuit_openings(self) -> int:
        return sum(path.read_text().count('"circuit open"') for path in self.logs.glob("dispatchd-*.log"))

    def stop(self) -> None:
        for process in (self.process, self.server):
            if process is not None:
                shutdown(process)


def free_ports(count: int) -> int:
    """A port ``p`` such that ``p`` … ``p + count - 1`` are free now (``worker --metrics-port``)."""
    for _ in range(100):
        base = free_port()
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


async def open_rows(db: Database) -> dict[str, int]:
    async with db.read() as session:
        rows = await session.execute(
            select(Notification.status, func.count())
            .where(Notification.status.in_([s.value for s in OPEN_STATUSES]))
            .group_by(Notification.status)
        )
        return {status: count for status, count in rows.all()}


async def run_dispatchd(
    database_url: str, fake: httpx.AsyncClient, args: argparse.Namespace, kill: bool, logs: Path
) -> Outcome:
    db = Database(database_url)
    async with db.transaction() as session:
        await session.execute(delete(Notification))
    await fake.post("/reset")
    logs = run_folder(logs, "dispatchd", kill)
    workers = DispatchdWorker(database_url, str(fake.base_url).rstrip("/"), args, logs)
    await workers.start()
    cpu = CpuAcrossRestarts()
    profiler = None
    if args.profile and not kill:
        # a flame graph of the server while it delivers (py-spy samples it from outside, 100 Hz)
        profiler = subprocess.Popen(  # noqa: ASYNC220 (started once, returns at once)
            [str(Path(sys.executable).with_name("py-spy")), "record", "-o", args.profile, "--pid",
             str(workers.process.pid), "--subprocesses", "--nonblocking", "--rate", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        started = time.time()
        cpu.start(workers.pids)
        async with db.transaction() as session:
            expires = session.info["now"] + timedelta(days=1)
            ids = await outbox.enqueue(
                session,
                [
                    Message(
                        recipient=f"+22170{i:07d}",
                        category="driver_offer",
                        body=f"Nouvelle course #{i}: Plateau → Aéroport AIBD, 12 000 FCFA",
                        expires_at=expires,
                    )
                    for i in range(args.messages)
                ],
            )
        outcome = Outcome("dispatchd", scenario(kill, args), args.messages, started, ids)
        deadline = time.monotonic() + args.timeout
        killed = False
        while time.monotonic() < deadline:
            unique = (await fake.get("/stats")).json()["unique"]
            cpu.observe(unique, args.messages)
            if kill and not killed and unique >= args.kill_at * args.messages:
                cpu.stop()
                sigkill(workers.process)
                killed = True
                outcome.in_flight_at_kill = (await open_rows(db)).get(NotificationStatus.SENDING, 0)
                await workers.start()
                cpu.start(workers.pids)
            if not await open_rows(db):  # every row final: nothing more will be sent
                outcome.finished = True
                break
            await asyncio.sleep(0.05)
        outcome.cpu_s = cpu.stop()
        outcome.window_cpu_ms = cpu.window_ms_per_message()
        outcome.stats = (await fake.get("/stats", params={"ids": 1, "times": 1})).json()
        left = await open_rows(db)
        if left:
            outcome.notes.append(f"still open: {left}")
        async with db.read() as session:
            retried = await session.scalar(
                select(func.count()).select_from(Notification).where(Notification.attempts > 1)
            )
        outcome.notes.append(f"{retried} rows needed >1 attempt")
        openings = workers.circuit_openings()
        outcome.notes.append(f"circuit breaker opened {openings}×" if openings else "breaker never opened")
        return outcome
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes the SVG on SIGINT
            profiler.wait(timeout=60)
        workers.stop()
        await db.dispose()


def dispatchd_layout(args: argparse.Namespace) -> str:
    if not args.worker_processes:
        return "one `serve` that delivers"
    return f"`serve --no-delivery` + `worker --processes {args.worker_processes}`"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="500 messages instead of 2000")
    parser.add_argument("--messages", type=int, help="messages per run (overrides --quick)")
    parser.add_argument("--fail-rate", type=float, default=0.2, help="share of calls failing (503)")
    parser.add_argument("--latency-ms", type=float, default=5.0, help="fake server latency per call")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="dispatchd sends in flight (and Celery threads)"
    )
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=2,
        help="dispatchd worker --processes N beside serve --no-delivery; 0: one serve that delivers",
    )
    parser.add_argument(
        "--provider-http",
        choices=["1.1", "2"],
        default="1.1",
        help="dispatchd's HTTP to the fake: 2 = HTTP/2 (h2c; the fake then runs under Hypercorn), "
        "1.1 = keep-alive (the fake under uvicorn, as before)",
    )
    parser.add_argument("--celery-pool", choices=["prefork", "threads"], default="prefork")
    parser.add_argument("--processes", type=int, default=16, help="Celery prefork pool size")
    parser.add_argument("--kill-at", type=float, default=0.4, help="share delivered before SIGKILL")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per run")
    parser.add_argument("--seed", type=int, default=4, help="seed of the fake's failure draw")
    parser.add_argument("--skip-kill", action="store_true", help="only the undisturbed runs")
    parser.add_argument(
        "--profile", metavar="SVG", help="record a py-spy flame graph of dispatchd's undisturbed run here"
    )
    parser.add_argument(
        "--systems", choices=["both", "dispatchd", "celery"], default="both", help="which systems to run"
    )
    args = parser.parse_args()
    args.messages = args.messages or (500 if args.quick else 2000)
    configure_logging("WARNING")
    load_before = load()

    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="bench-notifications-") as folder:
        logs = Path(folder)
        port = free_port()
        fake_log = logs / "fake.log"
        if args.provider_http == "2":  # uvicorn has no HTTP/2: the same fake under Hypercorn (h2c and 1.1)
            fake_command = ["-m", "bench.notifications_http2", "--serve", str(port), "--server", "hypercorn"]
        else:
            fake_command = ["-m", "bench.fake_whatsapp", "--port", str(port)]
        fake_process = spawn(
            [sys.executable, *fake_command,
             "--fail-rate", str(args.fail_rate), "--latency-ms", str(args.latency_ms),
             "--seed", str(args.seed)],
            fake_log,
        )  # fmt: skip
        fake_url = f"http://127.0.0.1:{port}"
        try:
            await wait_for(lambda: http_ok(f"{fake_url}/stats"), 20, "fake server", fake_process, fake_log)
            async with (
                httpx.AsyncClient(base_url=fake_url, timeout=30) as fake,
                fresh_database("postgres") as database_url,
            ):
                for kill in [False] if args.skip_kill else [False, True]:
                    if args.systems in ("both", "dispatchd"):
                        outcomes.append(await run_dispatchd(database_url, fake, args, kill, logs))
                    if args.systems in ("both", "celery"):
                        outcomes.append(await run_celery(fake, args, kill, logs))
        finally:
            shutdown(fake_process)

    fake_server = "Hypercorn" if args.provider_http == "2" else "uvicorn"
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load()}")
    print(f"PostgreSQL {await postgres_version()}, Redis at {REDIS_URL}")
    print(
        f"fake WhatsApp Cloud API: {args.fail_rate:.0%} of calls fail (503, Meta 131000), "
        f"{args.latency_ms:g} ms per answer (served by {fake_server}); "
        f"dispatchd: {dispatchd_layout(args)}, {args.concurrency} sends in flight per process, "
        f"HTTP/{args.provider_http} to the fake, "
        f"Celery: pool {celery_pool(args)}"
    )
    print()
    print(
        "| system | scenario | messages | end-to-end | completion rate | sustained rate (10 %→70 % of ids) "
        "| 80 % / 99 % / 100 % of ids after (s) | calls / 503s | server CPU per message: run / 10→70 % "
        "| lost | duplicates | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for outcome in outcomes:
        print(row(outcome))
    if args.systems != "both":
        return
    ours, theirs = outcomes[0], outcomes[1]
    print(
        f"| dispatchd ÷ Celery | undisturbed | | | {ratio(ours.completion_rate, theirs.completion_rate)} "
        f"| {ratio(ours.sustained_rate, theirs.sustained_rate)} | | "
        f"| {ratio(ours.cpu_ms_per_message, theirs.cpu_ms_per_message, None)} / "
        f"{ratio(ours.window_cpu_ms, theirs.window_cpu_ms, None)} | | "
        "| goal ≥ 2× the rate, 0 lost |"
    )


if __name__ == "__main__":
    asyncio.run(main())
