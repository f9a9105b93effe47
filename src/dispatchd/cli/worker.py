"""``dispatchd worker``: the outbox's delivery loop, and the alert monitor, with no HTTP server, in one or
several processes (PostgreSQL only).

What runs where (docs/operations.md, "Processes"):

* here: ``delivery`` (claims due rows with ``FOR UPDATE SKIP LOCKED`` and a lease, so any number of
  processes share the outbox; at least once) and ``alerts`` when ``DISPATCHD_ALERTS_ENABLED`` (each rule's
  cooldown is a row taken by a conditional write, so N monitors fire an alert once). The monitor belongs
  beside delivery: only the delivering process knows its channels' circuits (``CIRCUIT_OPEN``). It leaves
  the sweeper's rules to the monitors of ``serve``, where the sweeper runs.
* not here: the sweeper (every ``serve`` process runs one, ``/ready`` reports it, its claims are shared
  with ``SKIP LOCKED``), the realtime hub and agents' stream presence (they serve the connections of an
  HTTP process).

Wake-ups: a commit in another process cannot set this process's wake event, so the worker ``LISTEN``\\s on
``dispatchd_events`` (every commit that writes events or outbox messages notifies it): a message written by
``serve`` is claimed at once, not at the next poll (1 s).

``--processes N``: N > 1 are children started with multiprocessing's ``spawn`` and supervised by the
parent. A child that dies after it started is replaced (the rows it had claimed come back when their lease,
``DISPATCHD_DELIVERY_LEASE_S``, lapses: nothing is lost); a child that fails before it started (settings,
database unreachable for 30 s, schema) stops the worker with exit code 1, since a replacement would fail
the same way. ``DISPATCHD_CHANNEL_RATE`` is shared: each process drains ``rate / N``.

SIGTERM / SIGINT: each process stops claiming, lets the batch in flight finish (sent and recorded), and
exits; the parent waits for its children (one still busy ``DISPATCHD_DELIVERY_LEASE_S`` + 10 s later is
killed: its rows' leases lapse) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dispatchd.cli.common import settings
from dispatchd.cli.server import POSTGRES_HINT, refuse
from dispatchd.core.logging import get_logger

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.synchronize import Event as ProcessEvent

    from dispatchd.config import Settings

log = get_logger("dispatchd.worker")

#: the background loops (``Domain.background`` names) a worker process runs
WORKER_LOOPS = ("delivery", "alerts")
#: seconds between two looks of the parent at its children
SUPERVISE_S = 0.2
#: what a child's exit code says when it could not start
STARTUP_FAILED = 3


def worker(
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Delivery processes; a dead one is replaced, one that cannot start stops the worker "
            "(exit 1) [env DISPATCHD_WORKER_PROCESSES, default 1]",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            help="Serve Prometheus metrics of process i on this port + i (on DISPATCHD_HOST); unset: none",
        ),
    ] = None,
) -> None:
    """Deliver the outbox (and run the alert monitor) without an HTTP server; PostgreSQL only.

    Run it beside `dispatchd serve --no-delivery`. Each process claims due messages with a lease (SKIP
    LOCKED), so processes and machines share the outbox and a killed one loses nothing: its messages are
    claimed again when their lease (DISPATCHD_DELIVERY_LEASE_S) ends. DISPATCHD_CHANNEL_RATE is shared by
    the processes. SIGTERM or SIGINT: the batch in flight finishes, then exit 0. On SQLite: exit 2 (the
    delivery loop runs in `dispatchd serve` there)."""
    config = settings(worker_processes=processes)
    if config.is_sqlite:
        refuse(
            "worker",
            "needs PostgreSQL (on SQLite one `dispatchd serve` process delivers the outbox itself); "
            f"{POSTGRES_HINT}",
        )
    count = config.worker_processes
    overrides = {}
    if count > 1 and config.channel_rate:
        from dispatchd.core.serving import share_rate

        overrides["channel_rate"] = share_rate(config.channel_rate, count)
    if count == 1:
        code = run_process(0, overrides, metrics_port)
        code = 1 if code == STARTUP_FAILED else code  # the CLI's codes: 1 failed, 2 bad options
    else:
        from dispatchd.core.logging import configure_logging

        configure_logging(config.log_level, json=config.log_json)
        code = Supervisor(count, overrides, metrics_port, stop_timeout_s=config.delivery_lease_s + 10).run()
    raise typer.Exit(code)


# --------------------------------------------------------------------------------------- one process


async def run_worker(
    config: Settings,
    stop: asyncio.Event,
    *,
    index: int = 0,
    started: Callable[[], None] | None = None,
) -> None:
    """Run :data:`WORKER_LOOPS` until ``stop`` is set, then let them finish their batch and close.

    Waits for the database (30 s) and brings its schema to head first (under the migration lock, so the
    worker may start before or beside ``serve``); calls ``started()`` once the loops run. Raises what
    start-up raised (the database unreachable, an unknown revision)."""
    from dispatchd.assembly import build_services
    from dispatchd.migrate import upgrade, wait_for_database
    from dispatchd.realtime.wakeups import PostgresListener

    services = build_services(config)
    listener = None
    tasks: list[asyncio.Task] = []
    try:
        await wait_for_database(services.db)
        await upgrade(services.db)
        loops = {
            name: run
            for domain in services.domains
            for name, run in domain.background.items()
            if name in WORKER_LOOPS
        }
        services.alerts.sweeper = None  # no sweeper here: serve's monitors report it
        if services.db.is_postgres:
            listener = await PostgresListener.start(config.database_url, services.delivery.wake.set)
        tasks = [asyncio.create_task(run(stop), name=name) for name, run in loops.items()]
        log.info(
            "dispatchd worker started",
            loops=sorted(loops),
            process=index,
            pid=os.getpid(),
            channel=services.delivery.channel.name,
            channel_rate=config.channel_rate or None,
        )
        if started is not None:
            started()
        await stop.wait()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if listener is not None:
            await listener.close()
        await services.aclose()
    log.info("dispatchd worker stopped", process=index, pid=os.getpid())


def run_process(
    index: int,
    overrides: dict[str, Any],
    metrics_port: int | None,
    ready: ProcessEvent | None = None,
) -> int:
    """One worker process, in the foreground (``--processes 1``) or as a spawned child: settings, logging,
    the metrics port, SIGTERM / SIGINT handlers, :func:`run_worker`. Returns the exit code: 0 after a
    stop, :data:`STARTUP_FAILED` when it could not start, 1 when it failed later."""
    from dispatchd.config import SettingsError, load_settings
    from dispatchd.core.logging import configure_logging

    try:
        config = load_settings(**overrides)
    except SettingsError as exc:
        print(f"dispatchd worker cannot start: {exc}", flush=True)
        return STARTUP_FAILED
    configure_logging(config.log_level, json=config.log_json)
    running = False

    def started() -> None:
        nonlocal running
        running = True
        if ready is not None:
            ready.set()

    async def main() -> None:
        if metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(metrics_port + index, addr=config.host)  # a port in use: cannot start
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(config, stop, index=index, started=started)

    try:
        asyncio.run(main())
    except Exception:
        log.exception("dispatchd worker failed", process=index, pid=os.getpid(), started=running)
        return 1 if running else STARTUP_FAILED
    return 0


def _child(index: int, overrides: dict[str, Any], metrics_port: int | None, ready: ProcessEvent) -> None:
    """The target of a spawned child (importable, so that ``spawn`` finds it)."""
    raise SystemExit(run_process(index, overrides, metrics_port, ready))


# ---------------------------------------------------------------------------------------- supervisor


@dataclass
class Child:
    index: int
    process: SpawnProcess
    ready: ProcessEvent


class Supervisor:
    """Keeps ``count`` spawned worker processes alive until SIGTERM / SIGINT (see the module doc)."""

    def __init__(
        self, count: int, overrides: dict[str, Any], metrics_port: int | None, *, stop_timeout_s: float
    ) -> None:
        self.count = count
        self.overrides = overrides
        self.metrics_port = metrics_port
        self.stop_timeout_s = stop_timeout_s
        self.context = multiprocessing.get_context("spawn")
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.failed = False

    def start(self, index: int) -> Child:
        ready = self.context.Event()
        process = self.context.Process(
            target=_child,
            args=(index, self.overrides, self.metrics_port, ready),
            name=f"dispatchd-worker-{index}",
        )
        process.start()
        return Child(index, process, ready)

    def run(self) -> int:
        """Start the children, replace those that die, stop them on a signal; return the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("dispatchd worker supervising processes", processes=self.count, pid=os.getpid())
        self.children = [self.start(index) for index in range(self.count)]
        while not self.stopping.wait(SUPERVISE_S):
            self.keep_alive()
        self.stop_all()
        return 1 if self.failed else 0

    def keep_alive(self) -> None:
        for position, child in enumerate(self.children):
            code = child.process.exitcode
            if code is None:
                continue
            if not child.ready.is_set():
                log.error(
                    "worker process failed to start; stopping the worker",
                    process=child.index,
                    pid=child.process.pid,
                    exitcode=code,
                )
                self.failed = True
                self.stopping.set()
                return
            log.warning(
                "worker process died; starting another (its claimed messages return when their lease ends)",
                process=child.index,
                pid=child.process.pid,
                exitcode=code,
            )
            self.children[position] = self.start(child.index)

    def stop_all(self) -> None:
        for child in self.children:
            if child.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in self.children:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.exitcode is None:
                log.warning("worker process did not stop in time; killed", pid=child.process.pid)
                child.process.kill()
                child.process.join()
        log.info("dispatchd worker stopped", processes=self.count, pid=os.getpid())
