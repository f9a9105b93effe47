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
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bench.common import POSTGRES_URL, fmt_ms, fresh_database, machine, postgres_version, server
from dispatchd.core.db import Database
from dispatchd.core.logging import configure_logging
from dispatchd.core.stats import percentile
from dispatchd.reservations.service import ReservationService

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

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.duration

    def summary(self) -> str:
        check = "✅" if self.reserved == self.total_confirmed else "❌"
        others = ", ".join(f"{k} ×{v}" for k, v in sorted(self.other.items())) or "none"
        return (
            f"{self.rate:,.0f} commits/s ({self.rate * 60:,.0f}/min), "
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


async def bench_in_process(backend: str, clients: int, warmup: float, duration: float) -> Run:
    async with fresh_database(backend) as url:
        db = Database(url)
        svc = ReservationService(db)
        resource = await svc.create_resource(
            {"type": "seat", "name": "hot", "capacity": CAPACITY}, actor="bench"
        )

        async def attempt(i: int) -> str | None:
            outcome = await svc.reserve(resource.id, f"client-{i}", 1)
            return None if outcome.reservation is not None else outcome.refusal

        run = await drive(clients, warmup, duration, attempt)
        run.reserved = (await svc.get_resource(resource.id)).reserved
        await db.dispose()
    return run


async def bench_http(backend: str, clients: int, warmup: float, duration: float) -> Run:
    async with fresh_database(backend) as url:
        with server(url, ADMIN_KEY, rate_limit="", log_level="WARNING") as base:
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

                run = await drive(clients, warmup, duration, attempt)
                async with http.get(f"/v1/resources/{resource_id}") as answer:
                    run.reserved = (await answer.json())["reserved"]
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
    share = engine.rate / ceiling
    return f"{share:.0%} {'✅' if share >= 0.5 else '❌'}"


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
    args = parser.parse_args()
    configure_logging("WARNING")
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    duration = args.duration or (4.0 if args.quick else 10.0)
    warmup = 1.0 if args.quick else 2.0
    clients = args.clients

    load_before = load()
    in_process = {b: await bench_in_process(b, clients, warmup, duration) for b in backends}
    http = {b: await bench_http(b, clients, warmup, duration) for b in backends}
    ceiling = await bench_pgbench(clients, duration) if "postgres" in backends else {}

    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min) before: {load_before}, after: {load()}")
    if "postgres" in backends:
        print(f"PostgreSQL {await postgres_version()}")
    print(f"{clients} clients, one hot resource, {duration:g} s measured after {warmup:g} s warm-up")
    print()
    print("| benchmark | backend | result | goal / reference |")
    print("|---|---|---|---|")
    for what, runs in (("reserve() in process", in_process), ("POST /v1/reservations via HTTP", http)):
        for backend in backends:
            print(f"| {what} | {NAMES[backend]} | {runs[backend].summary()} | pretix {PRETIX_PER_MINUTE} |")
    if "error" in ceiling:
        print(f"| pgbench | PostgreSQL | {ceiling['error']} | ceiling |")
    elif ceiling:
        for label, what in (
            ("update", "pgbench single-row UPDATE (hot row ceiling)"),
            ("update_insert", "pgbench BEGIN; UPDATE hot row; INSERT 1 row; END"),
        ):
            value = ceiling[label]
            shown = f"{value:,.0f} tps ({value * 60:,.0f}/min)" if isinstance(value, float) else value
            print(f"| {what} | PostgreSQL | {shown} | - |")
        pg = "postgres"
        update, update_insert = ceiling["update"], ceiling["update_insert"]
        print(
            f"| in process ÷ pgbench UPDATE | PostgreSQL | {ratio(in_process[pg], update)} "
            f"(÷ UPDATE+INSERT: {ratio(in_process[pg], update_insert)}) | ≥ 50 % |"
        )
        print(
            f"| HTTP ÷ pgbench UPDATE | PostgreSQL | {ratio(http[pg], update)} "
            f"(÷ UPDATE+INSERT: {ratio(http[pg], update_insert)}) | ≥ 50 % |"
        )
    print(f"| pretix, documented before 2023 | - | ~5-7 tickets/s per event | {PRETIX_PER_MINUTE} |")


if __name__ == "__main__":
    asyncio.run(main())
