"""Matching benchmarks (issue 2 targets; seed 000 "Tests de charge").

1. Broadcast: ``start_matching`` to 100 and to 10,000 available drivers (target < 50 ms and < 1 s;
   seed: 100 drivers < 5 s).
2. 50 bookings started concurrently with 100 drivers: time of each start (target < 300 ms; seed < 3 s).
3. 200 concurrent accepts on one booking through HTTP, each driver with its own key, against a
   ``dispatchd serve`` process (target p99 < 100 ms, exactly one winner).

Usage: ``python bench/bench_matching.py [--backend sqlite|postgres|both] [--quick]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from sqlalchemy import insert

from bench.common import fmt_ms, fresh_database, machine, postgres_version, server
from dispatchd.core.clock import SystemClock
from dispatchd.core.db import Database
from dispatchd.core.ids import new_id
from dispatchd.core.logging import configure_logging
from dispatchd.core.stats import percentile
from dispatchd.matching.models import Driver
from dispatchd.matching.service import MatchingConfig, MatchingService

ADMIN_KEY = "dk_bench_admin_key_0123456789abcdef"


async def add_drivers(db: Database, count: int) -> list[str]:
    """Insert ``count`` AVAILABLE drivers around Dakar in one statement; return their ids."""
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
        for i in range(count)
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


async def bench_broadcast(backend: str, drivers: int, repeats: int) -> dict:
    async with fresh_database(backend) as url:
        db = Database(url)
        matching = MatchingService(db, MatchingConfig())
        await add_drivers(db, drivers)
        times = []
        for i in range(repeats):
            booking = await matching.create_booking(booking_fields(i))
            started = time.perf_counter()
            result = await matching.start_matching(booking.id)
            times.append(time.perf_counter() - started)
            assert result.drivers_notified == drivers
        await db.dispose()
    return {"median": statistics.median(times), "max": max(times)}


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


async def bench_http_accepts(backend: str, contenders: int = 200) -> dict:
    """All ``contenders`` accept one booking at once. The client is aiohttp in this process (httpx's
    pool costs milliseconds per request under this concurrency and would measure itself)."""
    async with fresh_database(backend) as url:
        with server(url, ADMIN_KEY) as base:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            connector = aiohttp.TCPConnector(limit=contenders + 10)
            async with aiohttp.ClientSession(base, connector=connector, headers=admin) as http:
                db = Database(url)
                driver_ids = await add_drivers(db, contenders)
                await db.dispose()
                keys = []
                for driver_id in driver_ids:
                    async with http.post(
                        "/v1/api-keys", json={"role": "driver", "driver_id": driver_id}
                    ) as created:
                        keys.append((await created.json())["key"])
                async with http.post("/v1/bookings", json=booking_fields(0)) as created:
                    booking_id = (await created.json())["id"]
                async with http.post(f"/v1/bookings/{booking_id}/matching", json={}) as started:
                    assert started.status == 200

                async def warm(
                    key: str,
                ) -> None:  # a first authenticated call per driver opens its connection
                    async with http.get("/health", headers={"Authorization": f"Bearer {key}"}) as answer:
                        await answer.read()

                await asyncio.gather(*(warm(k) for k in keys))
                barrier = asyncio.Barrier(contenders)

                async def accept(driver_id: str, key: str) -> tuple[float, str]:
                    await barrier.wait()
                    started = time.perf_counter()
                    async with http.post(
                        f"/v1/bookings/{booking_id}/responses",
                        json={"driver_id": driver_id, "type": "ACCEPT"},
                        headers={"Authorization": f"Bearer {key}"},
                    ) as answer:
                        body = await answer.json()
                    return time.perf_counter() - started, body["action"]

                wall = time.perf_counter()
                results = await asyncio.gather(*(accept(d, k) for d, k in zip(driver_ids, keys, strict=True)))
                wall = time.perf_counter() - wall
    times = [t for t, _ in results]
    actions = [a for _, a in results]
    return {
        "p50": percentile(times, 50),
        "p95": percentile(times, 95),
        "p99": percentile(times, 99),
        "max": max(times),
        "wall": wall,
        "winners": actions.count("ASSIGNED"),
        "already_taken": actions.count("ALREADY_TAKEN"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    configure_logging("WARNING", json=True)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    repeats = 3 if args.quick else 7
    print(f"machine: {machine()}")
    if "postgres" in backends:
        print(f"PostgreSQL {await postgres_version()}")
    print()
    print("| benchmark | backend | result | target |")
    print("|---|---|---|---|")
    for backend in backends:
        small = await bench_broadcast(backend, 100, repeats)
        print(
            f"| broadcast to 100 drivers | {backend} | median {fmt_ms(small['median'])}, "
            f"max {fmt_ms(small['max'])} | < 50 ms |"
        )
        large = await bench_broadcast(backend, 10_000, max(2, repeats // 2))
        print(
            f"| broadcast to 10,000 drivers | {backend} | median {fmt_ms(large['median'])}, "
            f"max {fmt_ms(large['max'])} | < 1 s |"
        )
        starts = await bench_concurrent_starts(backend)
        print(
            f"| 50 concurrent starts, 100 drivers | {backend} | per start p50 {fmt_ms(starts['p50'])}, "
            f"p95 {fmt_ms(starts['p95'])}, max {fmt_ms(starts['max'])}; "
            f"all 50 in {fmt_ms(starts['wall'])} | < 300 ms each |"
        )
        race = await bench_http_accepts(backend)
        print(
            f"| 200 concurrent accepts via HTTP | {backend} | p50 {fmt_ms(race['p50'])}, "
            f"p95 {fmt_ms(race['p95'])}, "
            f"p99 {fmt_ms(race['p99'])}, max {fmt_ms(race['max'])}, all in {fmt_ms(race['wall'])}; "
            f"winners {race['winners']}, "
            f"ALREADY_TAKEN {race['already_taken']} | p99 < 100 ms, 1 winner |"
        )


if __name__ == "__main__":
    asyncio.run(main())
