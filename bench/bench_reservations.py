"""Reservation commit throughput on one hot resource, against the hardware ceiling for a hot row.

What is measured (issue text: "commits per second on one hot resource with 64 concurrent clients, in
process and through HTTP, on SQLite and PostgreSQL; in the same run, pgbench's single-row UPDATE rate on
the same PostgreSQL, which is the hardware ceiling for a hot row. Goal: the engine path at least 50 % of
that ceiling."):

1. In process: a fresh, migrated database, one resource whose capacity never fills (1,000,000), and 64 asyncio
   tasks each looping ``ReservationService.reserve(resource, client, 1)`` for a fixed time after a warm-up.
   Every call is one conditional ``UPDATE … RETURNING`` on the same row, a reservation row, an event row
   and a commit. Reported: confirmed commits per second and per-commit latency p50 / p99 (as the caller
   sees it, queueing for a pool connection or the SQLite writer slot included).
2. Through HTTP: the same against a ``dispatchd serve`` process (per-key rate limit off), 64 aiohttp
   clients each POSTing ``/v1/reservations`` in a loop. Reported: 201 answers per second, latency p50 /
   p99, and any answer that is not 201.
3. Ceiling (PostgreSQL only): ``pgbench -n -c 64 -j 2 -T <duration>`` on the same server, in a throwaway
   database, running ``UPDATE hot SET n = n + 1 WHERE id = 1`` (one autocommit statement per
   transaction), and a variant closer to our transaction shape: ``BEGIN; UPDATE hot …; INSERT INTO log …;
   END`` (one row inserted per commit).

The ratios engine ÷ pgbench UPDATE are printed for the PostgreSQL rows (goal ≥ 50 %), and commits per
minute next to pretix's documented ~300-400 tickets per minute per event (before 2023). After each
engine run, the resource's ``reserved`` is read back and must equal the confirmed commits counted.

Usage: ``python -m bench.bench_reservations [--backend sqlite|postgres|both] [--quick]
[--duration S] [--clients N]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bench.common import (
    POSTGRES_URL,
    CpuMeter,
    fmt_ms,
    fresh_database,
    machine,
    postgres_version,
    server,
)
from dispatchd.core.db import Database
from dispatchd.core.logging import configure_logging
from dispatchd.core.stats import percentile
from dispatchd.reservations.service import ReservationsConfig, ReservationService

ADMIN_KEY = "dk_bench_admin_key_0123456789abcdef"
CAPACITY = 1_000_000  # the API's maximum; a run books a few tens of thousands at most
PRETIX_PER_MINUTE = "300-400/min"
NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


@dataclass
class Run:
    """Outcome of one fixed-duration run: commits finished inside the measured window and their latency."""

    duration: float
    latencies: list[float] = field(default_factory=list)
    total_confirmed: int = 0  # warm-up and overrun included: what ``reserved`` must equal
    other: Counter = field(default_factory=Counter)  # refusals, errors, non-201 answers
    reserved: int | None = None
    cpu_s: float | None = None  # CPU seconds the engine spent over the whole run (warm-up included)
    batches: tuple[float, float] | None = None  # (commits, requests admitted) over the whole run
    unit: str = "commit"  # what one operation is: "commit", or "answer" for the GET reference

    @property
    def cpu_ms_per_commit(self) -> float | None:
        return (
            None
            if self.cpu_s is None or not self.total_confirmed
            else self.cpu_s * 1000 / self.total_confirmed
        )

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.duration

    def summary(self) -> str:
        check = "✅" if self.reserved == self.total_confirmed else "❌"
        others = ", ".join(f"{k} ×{v}" for k, v in sorted(self.other.items())) or "none"
        cpu = f"{self.cpu_ms_per_commit:.2f} ms CPU/{self.unit}" if self.cpu_ms_per_commit else "CPU -"
        if self.unit != "commit":
            return f"{self.rate:,.0f} {self.unit}s/s, {cpu}, p50 {fmt_ms(percentile(self.latencies, 50))}"
        batch = ""
        if self.batches and self.batches[0]:
            batch = f", {self.batches[1] / self.batches[0]:.1f} requests per transaction"
        return (
            f"{self.rate:,.0f} commits/s, {cpu}{batch}, "
            f"p50 {fmt_ms(percentile(self.latencies, 50))}, p99 {fmt_ms(percentile(self.latencies, 99))}; "
            f"reserved {self.reserved:,} = {self.total_confirmed:,} confirmed {check}; "
            f"other answers: {others}"
        )


async def drive(clients: int, warmup: float, duration: float, attempt) -> Run:
    """Run ``attempt(i)`` in a loop on ``clients`` tasks; measure the window after ``warmup``.

    ``attempt`` returns None when the commit was confirmed, else a label for the other answer."""
    run = Run(duration)
    start = time.perf_counter()
    window_start, deadline = start + warmup, start + warmup + duration

    async def client(i: int) -> None:
        while (began := time.perf_counter()) < deadline:
            try:
                other = await attempt(i)
            except Exception as error:  # noqa: BLE001 - counted and reported, the run goes on
                other = f"{type(error).__name__}"
                await asyncio.sleep(0.01)
            finished = time.perf_counter()
            if other is not None:
                run.other[other] += 1
                continue
            run.total_confirmed += 1
            if began >= window_start and finished <= deadline:
                run.latencies.append(finished - began)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return run


def batch_histogram() -> tuple[float, float]:
    """(commits, requests admitted) so far in this process, from the group commit's histogram."""
    return (
        REGISTRY.get_sample_value("dispatchd_reservation_batch_size_count") or 0.0,
        REGISTRY.get_sample_value("dispatchd_reservation_batch_size_sum") or 0.0,
    )


def served_batches(metrics_text: str) -> tuple[float, float]:
    """(commits, requests admitted) from a server's /metrics text."""
    found = {}
    for line in metrics_text.splitlines():
        for name in ("count", "sum"):
            if line.startswith(f"dispatchd_reservation_batch_size_{name} "):
                found[name] = float(line.split()[1])
    return found.get("count", 0.0), found.get("sum", 0.0)


async def bench_in_process(backend: str, clients: int, warmup: float, duration: float, batch_max: int) -> Run:
    """``batch_max`` 1 commits each request alone (the engine before the group commit)."""
    async with fresh_database(backend) as url:
        db = Database(url)
        svc = ReservationService(db, ReservationsConfig(batch_max=batch_max))
        resource = await svc.create_resource(
            {"type": "seat", "name": "hot", "capacity": CAPACITY}, actor="bench"
        )

        async def attempt(i: int) -> str | None:
            outcome = await svc.reserve(resource.id, f"client-{i}", 1)
            return None if outcome.reservation is not None else outcome.refusal

        cpu, before = time.process_time(), batch_histogram()
        run = await drive(clients, warmup, duration, attempt)
        after = batch_histogram()
        run.cpu_s = time.process_time() - cpu
        run.batches = (after[0] - before[0], after[1] - before[1])
        run.reserved = (await svc.get_resource(resource.id)).reserved
        await db.dispose()
    return run


async def bench_trivial_get(
    backend: str, clients: int, warmup: float, duration: float, workers: int = 1
) -> Run:
    """The same clients looping ``GET /health`` on the same kind of server: the HTTP stack's own rate."""
    async with fresh_database(backend) as url:
        with server(url, ADMIN_KEY, rate_limit="", log_level="WARNING", workers=str(workers)) as base:
            connector = aiohttp.TCPConnector(limit=clients + 10)
            async with aiohttp.ClientSession(base, connector=connector) as http:

                async def attempt(i: int) -> str | None:
                    async with http.get("/health") as answer:
                        await answer.read()
                        return None if answer.status == 200 else f"HTTP {answer.status}"

                meter = CpuMeter(base.pid)
                run = await drive(clients, warmup, duration, attempt)
                run.cpu_s = meter.seconds()
                run.unit = "answer"
    return run


async def bench_http(
    backend: str, clients: int, warmup: float, duration: float, batch_max: int, workers: int = 1
) -> Run:
    """``workers`` > 1: ``dispatchd serve --workers`` (PostgreSQL), each process batching its own share."""
    async with fresh_database(backend) as url:
        settings = {"reservation_batch_max": str(batch_max), "workers": str(workers)}
        with server(url, ADMIN_KEY, rate_limit="", log_level="WARNING", **settings) as base:
            connector = aiohttp.TCPConnector(limit=clients + 10)
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            async with aiohttp.ClientSession(base, connector=connector, headers=headers) as http:
                body = {"type": "seat", "name": "hot", "capacity": CAPACITY}
                async with http.post("/v1/resources", json=body) as created:
                    assert created.status == 201, await created.text()
                    resource_id = (await created.json())["id"]

                async def attempt(i: int) -> str | None:
                    body = {"resource_id": resource_id, "client_id": f"client-{i}", "quantity": 1}
                    async with http.post("/v1/reservations", json=body) as answer:
                        payload = await answer.read()
                        if answer.status == 201:
                            return None
                        if answer.content_type.endswith("json"):
                            code = (await answer.json(content_type=None)).get("code")
                            if code:
                                return f"HTTP {answer.status} {code}"
                        return f"HTTP {answer.status} {payload[:60]!r}"

                meter = CpuMeter(base.pid)
                run = await drive(clients, warmup, duration, attempt)
                run.cpu_s = meter.seconds()
                async with http.get(f"/v1/resources/{resource_id}") as answer:
                    run.reserved = (await answer.json())["reserved"]
                async with http.get("/metrics") as answer:
                    run.batches = served_batches(await answer.text())
    return run


def pgbench_binary() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    fallback = "/usr/lib/postgresql/15/bin/pgbench"
    return fallback if os.path.exists(fallback) else None


UPDATE_ONLY = "UPDATE hot SET n = n + 1 WHERE id = 1;\n"
UPDATE_AND_INSERT = (
    "BEGIN;\n"
    "UPDATE hot SET n = n + 1 WHERE id = 1;\n"
    "INSERT INTO log (client, at) VALUES (:client_id, now());\n"
    "END;\n"
)


async def bench_pgbench(clients: int, duration: float) -> dict[str, float | str]:
    """tps of each script (UPDATE only; UPDATE + INSERT) in a throwaway database on the same server."""
    binary = pgbench_binary()
    if binary is None:
        return {"error": "pgbench not found (apt-get install postgresql-client-15)"}
    parsed = make_url(POSTGRES_URL)
    name = f"dispatchd_pgbench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    results: dict[str, float | str] = {}
    try:
        engine = create_async_engine(parsed.set(database=name))
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE hot (id int PRIMARY KEY, n bigint NOT NULL)"))
            await connection.execute(text("INSERT INTO hot VALUES (1, 0)"))
            await connection.execute(
                text("CREATE TABLE log (id bigserial PRIMARY KEY, client int NOT NULL, at timestamptz)")
            )
        await engine.dispose()
        env = {**os.environ}
        if parsed.password:
            env["PGPASSWORD"] = parsed.password
        with tempfile.TemporaryDirectory() as folder:
            for label, script in (("update", UPDATE_ONLY), ("update_insert", UPDATE_AND_INSERT)):
                path = Path(folder) / f"{label}.sql"
                path.write_text(script)
                command = [
                    binary, "-n", "-c", str(clients), "-j", "2", "-T", str(round(duration)), "-f", str(path),
                    "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432),
                    "-U", parsed.username or "postgres", name,
                ]  # fmt: skip
                for attempt in range(6):  # other sessions may hold connections for a while: retry
                    done = await asyncio.to_thread(
                        subprocess.run, command, env=env, capture_output=True, text=True
                    )
                    if "too many clients" not in done.stderr or attempt == 5:
                        break
                    await asyncio.sleep(10)
                found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
                if done.returncode != 0 or not found:
                    message = " ".join((done.stderr or done.stdout).split()).replace("|", "/")
                    results[label] = f"pgbench failed: {message[-300:]}"
                else:
                    results[label] = float(found.group(1))
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
    return results


def load() -> str:
    """The load average, to tell a quiet machine from a shared one."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def ratio(engine: Run | None, ceiling: float | str | None) -> str:
    if engine is None or not isinstance(ceiling, float) or ceiling <= 0:
        return "-"
    return f"{engine.rate / ceiling:.2f}×"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--quick", action="store_true", help="4 s runs after 1 s of warm-up (else 10 s after 2 s)"
    )
    parser.add_argument("--duration", type=float, help="measured seconds per run (overrides --quick)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also serve PostgreSQL with `dispatchd serve --workers N` (default 2; 1 skips that run)",
    )
    args = parser.parse_args()
    configure_logging("WARNING")
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    duration = args.duration or (4.0 if args.quick else 10.0)
    warmup = 1.0 if args.quick else 2.0
    clients = args.clients

    load_before = load()
    # batch_max 1 = each request commits alone (before the group commit); the default batches.
    modes = {"alone": 1, "group commit": 256}
    in_process = {
        (b, mode): await bench_in_process(b, clients, warmup, duration, size)
        for b in backends
        for mode, size in modes.items()
    }
    http = {
        (b, mode): await bench_http(b, clients, warmup, duration, size)
        for b in backends
        for mode, size in modes.items()
    }
    trivial = {b: await bench_trivial_get(b, clients, warmup, duration) for b in backends}
    several = f"group commit, {args.workers} processes"
    if "postgres" in backends and args.workers > 1:
        http[("postgres", several)] = await bench_http(
            "postgres", clients, warmup, duration, 256, args.workers
        )
        trivial[("postgres", several)] = await bench_trivial_get(
            "postgres", clients, warmup, duration, args.workers
        )
    ceiling = await bench_pgbench(clients, duration) if "postgres" in backends else {}

    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load()}")
    if "postgres" in backends:
        print(f"PostgreSQL {await postgres_version()}")
    print(f"{clients} clients, one hot resource, {duration:g} s measured after {warmup:g} s warm-up")
    print(
        "CPU/commit: in process, this process's CPU (clients included; SQLite runs in it, PostgreSQL "
        "does not); via HTTP, the server process's"
    )
    print()
    print("| benchmark | backend | commit | result | ÷ pgbench UPDATE | ÷ GET /health |")
    print("|---|---|---|---|---|---|")
    update = ceiling.get("update") if isinstance(ceiling.get("update"), float) else None
    for what, runs in (("reserve() in process", in_process), ("POST /v1/reservations", http)):
        for backend in backends:
            for mode in modes:
                run = runs[(backend, mode)]
                to_pgbench = ratio(run, update) if backend == "postgres" else "-"
                to_get = f"{run.rate / trivial[backend].rate:.2f}×" if what.startswith("POST") else "-"
                print(f"| {what} | {NAMES[backend]} | {mode} | {run.summary()} | {to_pgbench} | {to_get} |")
    if ("postgres", several) in http:
        run, reference = http[("postgres", several)], trivial[("postgres", several)]
        print(
            f"| POST /v1/reservations | PostgreSQL | {several} | {run.summary()} | {ratio(run, update)} "
            f"| {run.rate / reference.rate:.2f}× |"
        )
    for key, reference in trivial.items():
        backend, label = key if isinstance(key, tuple) else (key, "1 process")
        print(f"| GET /health (reference) | {NAMES[backend]} | {label} | {reference.summary()} | - | 1× |")
    if "error" in ceiling:
        print(f"| pgbench | PostgreSQL | - | {ceiling['error']} | ceiling | - |")
    elif ceiling:
        for label, what in (
            ("update", "pgbench single-row UPDATE (hot row ceiling)"),
            ("update_insert", "pgbench BEGIN; UPDATE hot row; INSERT 1 row; END"),
        ):
            value = ceiling[label]
            shown = f"{value:,.0f} tps" if isinstance(value, float) else value
            print(f"| {what} | PostgreSQL | - | {shown} | - | - |")
    for backend in backends:
        for runs, what in ((in_process, "in process"), (http, "HTTP")):
            alone, grouped = runs[(backend, "alone")], runs[(backend, "group commit")]
            cpu = (
                f"; CPU/commit {alone.cpu_ms_per_commit:.2f} → {grouped.cpu_ms_per_commit:.2f} ms"
                if alone.cpu_ms_per_commit and grouped.cpu_ms_per_commit
                else ""
            )
            print(
                f"group commit ÷ alone, {what}, {NAMES[backend]}: "
                f"{grouped.rate / alone.rate if alone.rate else float('nan'):.2f}× commits/s{cpu}"
            )
    print("goals: HTTP ≥ 1.0× pgbench UPDATE; in process ≥ 2×")


if __name__ == "__main__":
    asyncio.run(main())
