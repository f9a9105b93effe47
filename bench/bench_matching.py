"""Matching benchmarks (issue 2 targets; seed 000 "Tests de charge").

1. Broadcast: ``start_matching`` to 100 and to 10,000 available drivers (target < 50 ms and < 1 s;
   seed: 100 drivers < 5 s).
2. 50 bookings started concurrently with 100 drivers: time of each start (target < 300 ms; seed < 3 s).
3. 200 concurrent accepts on one booking through HTTP, each driver with its own key, against a
   ``dispatchd serve`` process (target p99 < 100 ms, exactly one winner), in several rounds.
4. The broadcast to 10,000 drivers through HTTP (``POST /v1/bookings/{id}/matching``) to the same server.

Issue 11: every HTTP figure comes with its reference, ``GET /health`` of the same server in the same run
with the same client (aiohttp) and concurrency (200 at once), as a ratio (operations/s ÷ GET /health
requests/s), and with the server's CPU time per operation (:class:`bench.common.CpuMeter`: ms per accept,
µs per driver offered). The in-process broadcast reports this process's CPU per driver (the database's
own CPU, PostgreSQL's, is not in it).

Usage: ``python -m bench.bench_matching [--backend sqlite|postgres|both] [--quick] [--only broadcast|http]
[--profile DIR]`` (``--profile``: py-spy flame graphs of the server during the accept rounds,
``DIR/accept-<backend>.svg``, and of this process during the 10,000-driver broadcast,
``DIR/broadcast-<backend>.svg``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from sqlalchemy import insert

from bench.common import CpuMeter, fmt_ms, fresh_database, machine, postgres_version, server
from dispatchd.core.clock import SystemClock
from dispatchd.core.db import Database
from dispatchd.core.ids import new_id
from dispatchd.core.logging import configure_logging
from dispatchd.core.stats import percentile
from dispatchd.matching.models import Driver
from dispatchd.matching.service import MatchingConfig, MatchingService

ADMIN_KEY = "dk_bench_admin_key_0123456789abcdef"
CONTENDERS = 200


@contextlib.contextmanager
def py_spy(pid: int, path: Path | None):
    """``py-spy record`` of ``pid`` into ``path`` (SVG flame graph) for the duration of the block."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    process = subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--rate", "200", "--output", str(path), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the work starts
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


async def add_drivers(db: Database, count: int, offset: int = 0) -> list[str]:
    """Insert ``count`` AVAILABLE drivers around Dakar (numbered from ``offset``: phones and plates are
    unique); return their ids."""
    now = SystemClock().now()
    rows = [
        {
            "id": new_id("drv"),
            "name": f"Driver {i}",
            "phone": f"+2217{i:08d}",
            "vehicle_type": "Berline",
            "vehicle_plate": f"DK-{i:06d}",
            "rating": 4.5,
            "status": "AVAILABLE",
            "lat": 14.6 + (i % 100) / 1000,
            "lon": -17.45 + (i // 100 % 100) / 1000,
            "last_seen_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(offset, offset + count)
    ]
    async with db.transaction() as session:
        for start in range(0, count, 2000):
            await session.execute(insert(Driver), rows[start : start + 2000])
    return [row["id"] for row in rows]


def booking_fields(i: int) -> dict:
    return {
        "customer_name": f"Customer {i}",
        "customer_phone": f"+2217{90000000 + i}",
        "pickup_address": "Place de l'Indépendance",
        "pickup_lat": 14.6681,
        "pickup_lon": -17.4312,
        "drop_address": "AIBD",
    }


async def bench_broadcast(backend: str, drivers: int, repeats: int, profile: Path | None = None) -> dict:
    """``start_matching`` in this process, ``repeats`` times (each to every driver; the drivers stay
    AVAILABLE, so each booking is offered to all of them): wall time, and this process's CPU per driver."""
    async with fresh_database(backend) as url:
        db = Database(url)
        matching = MatchingService(db, MatchingConfig())
        await add_drivers(db, drivers)
        times, cpu = [], 0.0
        with py_spy(os.getpid(), profile):
            for i in range(repeats):
                booking = await matching.create_booking(booking_fields(i))
                started, cpu_started = time.perf_counter(), time.process_time()
                result = await matching.start_matching(booking.id)
                times.append(time.perf_counter() - started)
                cpu += time.process_time() - cpu_started
                assert result.drivers_notified == drivers
        await db.dispose()
    return {
        "median": statistics.median(times),
        "max": max(times),
        "cpu_us_per_driver": cpu * 1e6 / (repeats * drivers),
    }


async def bench_concurrent_starts(backend: str, bookings: int = 50, drivers: int = 100) -> dict:
    async with fresh_database(backend) as url:
        db = Database(url)
        matching = MatchingService(db, MatchingConfig())
        await add_drivers(db, drivers)
        created = [await matching.create_booking(booking_fields(i)) for i in range(bookings)]

        async def start(booking_id: str) -> float:
            started = time.perf_counter()
            result = await matching.start_matching(booking_id)
            assert result.drivers_notified == drivers
            return time.perf_counter() - started

        wall = time.perf_counter()
        times = await asyncio.gather(*(start(b.id) for b in created))
        wall = time.perf_counter() - wall
        await db.dispose()
    return {"p50": percentile(times, 50), "p95": percentile(times, 95), "max": max(times), "wall": wall}


async def _burst(http: aiohttp.ClientSession, calls: list) -> tuple[float, list]:
    """Run ``calls`` (coroutine functions) at once behind a barrier; (wall s, [(seconds, result)])."""
    barrier = asyncio.Barrier(len(calls))

    async def timed(call):
        await barrier.wait()
        started = time.perf_counter()
        result = await call()
        return time.perf_counter() - started, result

    wall = time.perf_counter()
    results = await asyncio.gather(*(timed(call) for call in calls))
    return time.perf_counter() - wall, results


async def bench_http(backend: str, rounds: int, broadcast_drivers: int, profile: Path | None = None) -> dict:
    """Against one ``dispatchd serve``: GET /health (``rounds`` bursts of 200 at once), then ``rounds``
    accept races (200 drivers, each with its own key, accept one booking at once; the winner's trip is
    completed before the next round), then a broadcast to ``broadcast_drivers`` (+ the 200) over HTTP.
    Server CPU over each phase (CpuMeter), per operation."""
    async with fresh_database(backend) as url:
        with server(url, ADMIN_KEY) as base:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            connector = aiohttp.TCPConnector(limit=CONTENDERS + 10)
            async with aiohttp.ClientSession(base, connector=connector, headers=admin) as http:
                db = Database(url)
                driver_ids = await add_drivers(db, CONTENDERS)
                keys = []
                for driver_id in driver_ids:
                    async with http.post(
                        "/v1/api-keys", json={"role": "driver", "driver_id": driver_id}
                    ) as created:
                        keys.append((await created.json())["key"])

                def health(key: str):
                    async def call() -> int:
                        async with http.get("/health", headers={"Authorization": f"Bearer {key}"}) as answer:
                            await answer.read()
                            return answer.status

                    return call

                # a first call per driver opens its connection; then the reference
                await _burst(http, [health(k) for k in keys])
                health_times, health_wall = [], 0.0
                meter = CpuMeter(base.pid)
                for _ in range(rounds):
                    wall, results = await _burst(http, [health(k) for k in keys])
                    assert all(status == 200 for _, status in results)
                    health_wall += wall
                    health_times += [t for t, _ in results]
                health_cpu_ms = meter.per_operation(len(health_times))
                health_rps = len(health_times) / health_wall

                def accept(booking_id: str, driver_id: str, key: str):
                    async def call() -> str:
                        async with http.post(
                            f"/v1/bookings/{booking_id}/responses",
                            json={"driver_id": driver_id, "type": "ACCEPT"},
                            headers={"Authorization": f"Bearer {key}"},
                        ) as answer:
                            return (await answer.json())["action"]

                    return call

                accept_times, accept_wall, accept_cpu, winners, taken = [], 0.0, 0.0, [], 0
                with py_spy(base.pid, profile):
                    for round_ in range(rounds):
                        async with http.post("/v1/bookings", json=booking_fields(round_)) as created:
                            booking_id = (await created.json())["id"]
                        async with http.post(f"/v1/bookings/{booking_id}/matching", json={}) as started:
                            assert (await started.json())["drivers_notified"] == CONTENDERS
                        meter = CpuMeter(base.pid)
                        wall, results = await _burst(
                            http, [accept(booking_id, d, k) for d, k in zip(driver_ids, keys, strict=True)]
                        )
                        accept_cpu += meter.seconds()
                        accept_wall += wall
                        accept_times += [t for t, _ in results]
                        actions = [a for _, a in results]
                        winners.append(actions.count("ASSIGNED"))
                        taken += actions.count("ALREADY_TAKEN")
                        async with http.post(f"/v1/bookings/{booking_id}/complete", json={}) as done:
                            assert done.status == 200
                accepts = len(accept_times)

                await add_drivers(db, broadcast_drivers, offset=CONTENDERS)
                await db.dispose()
            # a new connection: the server may have closed idle keep-alive ones while the drivers were added
            async with aiohttp.ClientSession(base, headers=admin) as http:
                broadcast_times, broadcast_cpu, offered = [], 0.0, 0
                for round_ in range(3):
                    async with http.post("/v1/bookings", json=booking_fields(100 + round_)) as created:
                        booking_id = (await created.json())["id"]
                    meter = CpuMeter(base.pid)
                    started = time.perf_counter()
                    async with http.post(f"/v1/bookings/{booking_id}/matching", json={}) as answer:
                        notified = (await answer.json())["drivers_notified"]
                    broadcast_times.append(time.perf_counter() - started)
                    broadcast_cpu += meter.seconds()
                    assert notified == broadcast_drivers + CONTENDERS
                    offered += notified
    return {
        "health_rps": health_rps,
        "health_p99": percentile(health_times, 99),
        "health_cpu_ms": health_cpu_ms,
        "p50": percentile(accept_times, 50),
        "p95": percentile(accept_times, 95),
        "p99": percentile(accept_times, 99),
        "max": max(accept_times),
        "accept_rps": accepts / accept_wall,
        "accept_cpu_ms": accept_cpu * 1000 / accepts,
        "winners": winners,
        "already_taken": taken,
        "accepts": accepts,
        "broadcast_median": statistics.median(broadcast_times),
        "broadcast_drivers": broadcast_drivers + CONTENDERS,
        "broadcast_drivers_per_s": offered / sum(broadcast_times),
        "broadcast_cpu_us": broadcast_cpu * 1e6 / offered,
    }


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}× GET /health" if reference else "-"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", choices=["broadcast", "starts", "http"], action="append")
    parser.add_argument("--profile", type=Path, help="write py-spy flame graphs into this folder")
    args = parser.parse_args()
    configure_logging("WARNING", json=True)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    only = set(args.only or ["broadcast", "starts", "http"])
    repeats = 3 if args.quick else 7
    print(f"machine: {machine()}")
    if "postgres" in backends:
        print(f"PostgreSQL {await postgres_version()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| benchmark | backend | result | target |")
    print("|---|---|---|---|")
    for backend in backends:
        if "broadcast" in only:
            small = await bench_broadcast(backend, 100, repeats)
            print(
                f"| broadcast to 100 drivers, in process | {backend} | median {fmt_ms(small['median'])}, "
                f"max {fmt_ms(small['max'])}; CPU {small['cpu_us_per_driver']:.0f} µs/driver | < 50 ms |"
            )
            large = await bench_broadcast(
                backend,
                10_000,
                max(2, repeats // 2),
                args.profile / f"broadcast-{backend}.svg" if args.profile else None,
            )
            print(
                f"| broadcast to 10,000 drivers, in process | {backend} | median {fmt_ms(large['median'])}, "
                f"max {fmt_ms(large['max'])}; CPU {large['cpu_us_per_driver']:.0f} µs/driver | < 1 s |"
            )
        if "starts" in only:
            starts = await bench_concurrent_starts(backend)
            print(
                f"| 50 concurrent starts, 100 drivers | {backend} | per start p50 {fmt_ms(starts['p50'])}, "
                f"p95 {fmt_ms(starts['p95'])}, max {fmt_ms(starts['max'])}; "
                f"all 50 in {fmt_ms(starts['wall'])} | < 300 ms each |"
            )
        if "http" in only:
            rounds = 3 if args.quick else 5
            race = await bench_http(
                backend,
                rounds,
                10_000 - CONTENDERS,
                args.profile / f"accept-{backend}.svg" if args.profile else None,
            )
            print(
                f"| GET /health, {CONTENDERS} at once × {rounds} (reference) | {backend} | "
                f"{race['health_rps']:.0f} req/s, p99 {fmt_ms(race['health_p99'])}; "
                f"CPU {race['health_cpu_ms']:.2f} ms/req | |"
            )
            print(
                f"| {CONTENDERS} concurrent accepts via HTTP × {rounds} rounds | {backend} | "
                f"p50 {fmt_ms(race['p50'])}, p95 {fmt_ms(race['p95'])}, p99 {fmt_ms(race['p99'])}, "
                f"max {fmt_ms(race['max'])}; {race['accept_rps']:.0f} accepts/s = "
                f"{_ratio(race['accept_rps'], race['health_rps'])}; "
                f"CPU {race['accept_cpu_ms']:.2f} ms/accept "
                f"= {race['accept_cpu_ms'] / race['health_cpu_ms']:.2f}× GET /health; "
                f"winners per round {race['winners']}, ALREADY_TAKEN {race['already_taken']} of "
                f"{race['accepts']} | p99 < 100 ms, 1 winner |"
            )
            print(
                f"| broadcast to {race['broadcast_drivers']:,} drivers via HTTP | {backend} | "
                f"median {fmt_ms(race['broadcast_median'])}; {race['broadcast_drivers_per_s']:.0f} drivers/s "
                f"= {_ratio(race['broadcast_drivers_per_s'], race['health_rps'])}; "
                f"CPU {race['broadcast_cpu_us']:.0f} µs/driver | < 1 s |"
            )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    asyncio.run(main())
