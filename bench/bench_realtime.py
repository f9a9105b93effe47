"""The realtime hub (issue "Speed: connections"): 10,000 SSE connections on one ``dispatchd serve``.

What is measured, on a fresh database (SQLite file or a new PostgreSQL database, dropped afterwards) and one
``dispatchd serve`` process (this checkout's ``src`` first on the path, cwd a temp dir so no ``.env`` is
read, ``DISPATCHD_STREAM_MAX_PER_KEY=20000``, logs at WARNING, the rest at its default):

1. **Memory.** ``--connections`` (10,000) SSE streams ``GET /v1/stream?topic=bench:all&topic=bench:<i>``,
   all on the bootstrap admin key, opened by ``--procs`` client processes (:mod:`bench.realtime_load`: raw
   asyncio protocols, HTTP/1.1 and SSE parsed by hand, uvloop). The server's RSS (``VmRSS`` of
   ``/proc/<pid>/status``) before (after a warm-up of a few streams, opened, sent one event and closed)
   and after (once ``dispatchd_stream_connections{transport="sse"}`` in ``/metrics`` reached the count
   and the RSS stopped moving): the difference divided by the connections. Goal ≤ 50 KB.
2. **Fan-out.** ``--fanout`` (10) times: one event on ``bench:all`` (``POST /v1/events``), which every
   stream receives; the next only once all have it (or after 10 s). Latency = the client's receive time
   (``time.time()`` when the frame's last byte is read, before parsing) minus ``sent_at``, the publisher's
   ``time.time()`` just before the ``POST`` (carried in the event's data); also minus the event's
   ``created_at`` (its transaction time). Pooled over all receptions. Goal p99 < 100 ms.
3. **Distinct topics.** ``--rate`` (1,000) events/s for ``--seconds`` (15), each to the next of the
   ``bench:<i>`` topics in turn (so to one stream each), posted open-loop in batches of ``--batch`` (50)
   on a fixed schedule, whether or not the previous ``POST`` answered.
4. **The seed's design.** The streams are closed; ``--pollers`` (1,000) simulated clients of the seed's
   Laravel SSE loop each run ``SELECT COUNT(*) FROM events WHERE topic = :t`` every ``--poll-interval``
   (2 s) *directly against the same database* (sqlite3 read-only connections, one per client; on
   PostgreSQL asyncpg pools of ``--poll-pool`` connections per process, not reset between queries:
   PostgreSQL allows 100 connections here, not one per client as PHP-FPM would hold), and when the count
   moved ``SELECT`` the new rows
   (what the loop then pushed). Meanwhile ``--poll-rate`` (50) events/s go to random ``bench:p<j>``
   topics through ``POST /v1/events``. Reported: database queries/s and commit → noticed latency
   (noticed = when the ``COUNT`` answered; from ``sent_at`` and from ``created_at``).
5. **Client check** (run before 4). Each client process reports its CPU time, wall time and event loop
   lag (a 10 ms sleep's overshoot, p99 and max) per phase, and its CPU per frame; then (unless
   ``--no-client-check``) the fan-out is measured again with the same connections spread over twice the
   processes: if the client were the bottleneck, halving each process's share would cut the latency.

Beside each phase: the server's CPU seconds (``/proc/<pid>/stat``), and on PostgreSQL the database's
transactions/s (``pg_stat_database``) with the streams idle and with the pollers.

Percentiles: linear interpolation between closest ranks (numpy's default). Everything — server, database,
client processes — shares this machine's cores.

Usage: ``python -m bench.bench_realtime [--backend sqlite|postgres|both] [--connections 10000] [--quick]
[--procs 4] [--fanout 10] [--rate 1000] [--seconds 15] [--pollers 1000] [--json PATH]``
(``--quick``: 1,000 connections, 5 fan-outs, 5 s of distinct topics, 8 s of polling; under a minute).
``--url URL --pid PID --database-url URL --key KEY`` measures a server already running instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import fresh_database, machine, postgres_version
from bench.outbox_peak_procs import ROOT, clean_env, get_ok, git, load_average, stop, tail
from bench.realtime_load import Fleet, cpu_seconds, raise_nofile, rss_kib
from dispatchd.core.stats import percentile

ADMIN_KEY = "dk_" + secrets.token_urlsafe(30)  # 43 characters, as a generated key
ALL_TOPIC = "bench:all"
TOPIC_PREFIX = "bench:"
POLL_PREFIX = "bench:p"
CONNECTIONS_GAUGE = re.compile(r'^dispatchd_stream_connections\{[^}]*transport="sse"[^}]*\}\s+(\S+)', re.M)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def summary(values) -> dict[str, float | None]:
    values = list(values)
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


def split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


# ------------------------------------------------------------------------------------------ the server


class Target:
    """The server under test: its base URL, its pid (for RSS and CPU), its database, its admin key."""

    def __init__(self, base: str, pid: int, database_url: str, key: str, backend: str) -> None:
        self.base, self.pid, self.database_url, self.key, self.backend = base, pid, database_url, key, backend
        self.http: aiohttp.ClientSession | None = None

    async def connections(self) -> float | None:
        async with self.http.get("/metrics") as answer:
            text = await answer.text()
        found = CONNECTIONS_GAUGE.search(text)
        return float(found.group(1)) if found else None

    async def wait_connections(self, wanted: int, timeout_s: float) -> tuple[float | None, float]:
        started = time.perf_counter()
        value = None
        while time.perf_counter() - started < timeout_s:
            value = await self.connections()
            if value is None or int(value) == wanted:
                break
            await asyncio.sleep(0.25)
        return value, time.perf_counter() - started

    async def settled_rss(self, timeout_s: float = 15.0) -> int:
        """The server's RSS once two readings 1 s apart differ by less than 0.5 %."""
        last = rss_kib(self.pid)
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            await asyncio.sleep(1.0)
            now = rss_kib(self.pid)
            if abs(now - last) <= 0.005 * last:
                return now
            last = now
        return last

    async def publish(self, events: list[dict[str, Any]]) -> list[int]:
        async with self.http.post("/v1/events", json={"events": events}) as answer:
            body = await answer.text()
            if answer.status != 201:
                raise RuntimeError(f"POST /v1/events → {answer.status}: {body[:500]}")
        return json.loads(body).get("ids", [])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def dsn(self) -> str:
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    def sqlite_path(self) -> str:
        return self.database_url.split(":///", 1)[1]

    async def transactions(self) -> int | None:
        """xact_commit + xact_rollback of the server's PostgreSQL database (None on SQLite)."""
        if self.backend != "postgres":
            return None
        import asyncpg

        connection = await asyncpg.connect(self.dsn())
        try:
            return await connection.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
            )
        finally:
            await connection.close()


def postgres_cpu() -> float:
    """CPU seconds of every ``postgres`` process on this machine (read from /proc)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    total += cpu_seconds(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return total


@asynccontextmanager
async def served(backend: str, folder: Path):
    """A fresh database and a ``dispatchd serve`` on it, until healthy; yield the :class:`Target`."""
    from bench.common import free_port

    async with fresh_database(backend) as url:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = folder / f"server-{backend}.log"
        env = clean_env(
            DISPATCHD_DATABASE_URL=url,
            DISPATCHD_ADMIN_API_KEY=ADMIN_KEY,
            DISPATCHD_STREAM_MAX_PER_KEY="20000",
            DISPATCHD_LOG_JSON="true",
            DISPATCHD_LOG_LEVEL="WARNING",
        )
        with log_path.open("w") as log:
            process = subprocess.Popen(  # noqa: ASYNC220 (started once, returns at once)
                [sys.executable, "-m", "dispatchd", "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 120
                while not (get_ok(f"{base}/health") and get_ok(f"{base}/ready")):
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"dispatchd serve exited ({process.returncode}):\n{tail(log_path)}"
                        )
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"dispatchd serve not ready after 120 s:\n{tail(log_path)}")
                    await asyncio.sleep(0.2)
                target = Target(base, process.pid, url, ADMIN_KEY, backend)
                target.log_path = log_path
                yield target
            finally:
                target_stopped = stop(process)
                print(f"  server stopped: {target_stopped}", flush=True)


# ------------------------------------------------------------------------------------------ phases


async def connect(target: Target, fleet: Fleet, indices: list[int], concurrency: int) -> dict[str, Any]:
    answers = await fleet.ask(
        "connect", [[chunk, concurrency, 30.0] for chunk in split(indices, len(fleet.pids))]
    )
    failures: dict[str, int] = {}
    for answer in answers:
        for reason, count in answer["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
    times = [t for answer in answers for t in answer["connect_times"]]
    return {
        "wanted": len(indices),
        "connected": sum(a["connected"] for a in answers),
        "seconds": max(a["seconds"] for a in answers),
        "failures": failures,
        "connect_p50_s": percentile(times, 50),
        "connect_p99_s": percentile(times, 99),
    }


async def received(fleet: Fleet) -> int:
    return sum(await fleet.ask("count"))


def client_figures(answers: list[dict], frames: int) -> dict[str, Any]:
    cpu = sum(a["cpu_s"] for a in answers)
    wall = max(a["wall_s"] for a in answers)
    return {
        "processes": len(answers),
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "cpu_share_of_wall": round(cpu / wall / len(answers), 4) if wall else None,
        "busiest_process_cpu_share": round(max(a["cpu_s"] / a["wall_s"] for a in answers), 4),
        "cpu_per_frame_us": round(cpu / frames * 1e6, 2) if frames else None,
        "loop_lag_p99_s": max(a["lag_p99_s"] for a in answers),
        "loop_lag_max_s": max(a["lag_max_s"] for a in answers),
        "lost": sum(a["lost"] for a in answers),
        "unparsed": sum(a["unparsed"] for a in answers),
    }


def pooled(answers: list[dict]) -> tuple[list[float], list[float], dict[int, int]]:
    by_sent = [v for a in answers for v in a["by_sent"]]
    by_created = [v for a in answers for v in a["by_created"]]
    ids: dict[int, int] = {}
    for a in answers:
        for event_id, count in a["ids"].items():
            ids[event_id] = ids.get(event_id, 0) + count
    return by_sent, by_created, ids


async def fanout(target: Target, fleet: Fleet, connected: int, repeats: int) -> dict[str, Any]:
    """``repeats`` events on ``bench:all``; each waits until every stream has the previous one."""
    await fleet.ask("start")
    cpu0 = target.cpu()
    posts, complete_after, published = [], [], []
    expected = 0
    for seq in range(repeats):
        await asyncio.sleep(0.5)
        sent_at = time.time()
        ids = await target.publish(
            [{"topic": ALL_TOPIC, "type": "Tick", "data": {"sent_at": sent_at, "seq": seq}}]
        )
        posts.append(time.time() - sent_at)
        published += ids
        expected += connected
        deadline = time.perf_counter() + 10.0
        while time.perf_counter() < deadline:
            if await received(fleet) >= expected:
                break
            await asyncio.sleep(0.02)
        complete_after.append(time.time() - sent_at)
    answers = await fleet.ask("finish")
    server_cpu = target.cpu() - cpu0
    by_sent, by_created, ids = pooled(answers)
    frames = sum(a["received"] for a in answers)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for a in answers:
        for event_id, latency in zip(a["event_ids"], a["by_sent"], strict=True):
            first[event_id] = min(first.get(event_id, math.inf), latency)
            last[event_id] = max(last.get(event_id, -math.inf), latency)
    busy = sum(last.values())  # the server's wall time fanning out, from each POST to its last reception
    return {
        "events": repeats,
        "first_reception": summary(first.values()),
        "last_reception": summary(last.values()),
        "server_cpu_share_while_fanning_out": round(server_cpu / busy, 3) if busy else None,
        "expected_deliveries": expected,
        "delivered": frames,
        "incomplete_events": sum(1 for event_id in published if ids.get(event_id, 0) < connected),
        "publish_to_receive": summary(by_sent),
        "created_to_receive": summary(by_created),
        "post_answered": summary(posts),
        "all_received_after_s": [round(v, 4) for v in complete_after],
        "server_cpu_s": round(server_cpu, 3),
        "client": client_figures(answers, frames),
    }


async def distinct(
    target: Target, fleet: Fleet, connected: int, rate: float, seconds: float, batch: int
) -> dict[str, Any]:
    """``rate`` events/s, each to the next ``bench:<i>`` topic, in batches posted open-loop."""
    await fleet.ask("start")
    cpu0 = target.cpu()
    total = int(rate * seconds)
    batches = math.ceil(total / batch)
    interval = batch / rate
    posts: list[float] = []
    late: list[float] = []
    errors: list[str] = []
    origin = time.perf_counter() + 0.2

    async def post(number: int) -> None:
        due = origin + number * interval
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        late.append(time.perf_counter() - due)
        first = number * batch
        sent_at = time.time()
        events = [
            {"topic": f"{TOPIC_PREFIX}{k % connected}", "type": "Tick", "data": {"sent_at": sent_at, "k": k}}
            for k in range(first, min(first + batch, total))
        ]
        try:
            await target.publish(events)
        except Exception as error:  # counted, the schedule goes on
            errors.append(str(error)[:300])
        posts.append(time.time() - sent_at)

    await asyncio.gather(*(post(n) for n in range(batches)))
    published_s = time.perf_counter() - origin
    deadline = time.perf_counter() + 10.0
    while time.perf_counter() < deadline and await received(fleet) < total:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    answers = await fleet.ask("finish")
    server_cpu = target.cpu() - cpu0
    by_sent, by_created, ids = pooled(answers)
    frames = sum(a["received"] for a in answers)
    return {
        "published": total,
        "batches": batches,
        "batch": batch,
        "publish_seconds": round(published_s, 3),
        "achieved_rate": round(total / published_s, 1),
        "post_errors": len(errors),
        "post_error_sample": errors[:3],
        "post_answered": summary(posts),
        "post_started_late_max_s": max(late) if late else None,
        "delivered": frames,
        "distinct_delivered": len(ids),
        "duplicates": frames - len(ids),
        "publish_to_receive": summary(by_sent),
        "created_to_receive": summary(by_created),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_share": round(server_cpu / published_s, 3),
        "client": client_figures(answers, frames),
    }


async def idle_window(target: Target, seconds: float) -> dict[str, Any]:
    """The server's CPU and the database's transactions over ``seconds`` with the streams idle."""
    cpu0, pg0, tx0 = target.cpu(), postgres_cpu(), await target.transactions()
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - started
    tx1 = await target.transactions()
    return {
        "seconds": round(wall, 2),
        "server_cpu_share": round((target.cpu() - cpu0) / wall, 4),
        "postgres_cpu_share": round((postgres_cpu() - pg0) / wall, 4)
        if target.backend == "postgres"
        else None,
        # minus our own two reads of pg_stat_database
        "db_transactions_per_s": None if tx0 is None else round((tx1 - tx0 - 1) / wall, 1),
    }


async def polling(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """The seed's design: ``--pollers`` clients each ``COUNT(*)`` their topic every ``--poll-interval``."""
    procs = max(1, min(args.procs, math.ceil(args.pollers / 250)))
    params = {"backend": target.backend}
    if target.backend == "postgres":
        params["dsn"] = target.dsn()
    else:
        params["path"] = target.sqlite_path()
    topics = [f"{POLL_PREFIX}{j}" for j in range(args.pollers)]
    fleet = Fleet("poll", procs, params)
    try:
        await fleet.ask("prepare", [[chunk, args.poll_pool] for chunk in split(topics, procs)])
        start_at = time.time() + 0.5
        task = asyncio.create_task(
            fleet.ask("poll", [[start_at, args.poll_interval, args.poll_seconds]] * procs)
        )
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0, pg0, tx0 = target.cpu(), postgres_cpu(), await target.transactions()
        started = time.perf_counter()
        # publish after every poller's first tick, and while each has at least one more tick to come
        await asyncio.sleep(args.poll_interval)
        publish_until = started + args.poll_seconds - args.poll_interval - 0.5
        sent: list[float] = []
        interval = 0.1
        per_tick = args.poll_rate * interval
        carry = 0.0
        next_at = time.perf_counter()
        while time.perf_counter() < publish_until and not task.done():
            carry += per_tick
            count, carry = int(carry), carry - int(carry)
            if count:
                sent_at = time.time()
                await target.publish(
                    [
                        {"topic": random.choice(topics), "type": "Tick", "data": {"sent_at": sent_at}}
                        for _ in range(count)
                    ]
                )
                sent += [sent_at] * count
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        answers = await task
        wall = time.perf_counter() - started
        tx1 = await target.transactions()
        server_cpu = target.cpu() - cpu0
        postgres = postgres_cpu() - pg0
    finally:
        await fleet.stop()
    seen = [s for a in answers for s in a["seen"]]
    counts = sum(a["counts"] for a in answers)
    fetches = sum(a["fetches"] for a in answers)
    poll_wall = args.poll_seconds  # the window: every tick due within it ran once (a query may end after)
    client_cpu = sum(a["cpu_s"] for a in answers)
    count_times = [t for a in answers for t in a["count_times"]]
    return {
        "pollers": args.pollers,
        "processes": procs,
        "interval_s": args.poll_interval,
        "seconds": round(poll_wall, 2),
        "published": len(sent),
        "noticed": len(seen),
        "count_queries": counts,
        "fetch_queries": fetches,
        "queries_per_s": round((counts + fetches) / poll_wall, 1),
        "count_queries_per_s": round(counts / poll_wall, 1),
        "count_query_time": summary(count_times),
        "publish_to_noticed": summary(noticed - sent_at for noticed, sent_at, _ in seen),
        "created_to_noticed": summary(noticed - created for noticed, _, created in seen),
        "db_transactions_per_s": None if tx0 is None else round((tx1 - tx0 - 1) / wall, 1),
        "server_cpu_share": round(server_cpu / wall, 4),
        "postgres_cpu_share": round(postgres / wall, 4) if target.backend == "postgres" else None,
        "poller_cpu_share": round(client_cpu / poll_wall, 4),
        "poller_loop_lag_max_s": max(a["lag_max_s"] for a in answers),
    }


async def measure(target: Target, args: argparse.Namespace, say) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": target.backend}
    n = args.connections
    params = {
        "host": "127.0.0.1",
        "port": int(target.base.rsplit(":", 1)[1]),
        "path": "/v1/stream",
        "key": target.key,
        "all_topic": ALL_TOPIC,
        "topic_prefix": TOPIC_PREFIX,
    }
    fleet = Fleet("sse", args.procs, params)
    try:
        # warm-up: a few streams, one event, closed; then the baseline
        warm = list(range(n, n + 5 * args.procs))
        warmed = await connect(target, fleet, warm, 10)
        if warmed["connected"] == 0:
            raise RuntimeError(f"no stream could connect: {warmed['failures']}")
        await fleet.ask("start")
        await target.publish([{"topic": ALL_TOPIC, "type": "Warm", "data": {"sent_at": time.time()}}])
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline and await received(fleet) < warmed["connected"]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        warm_result = await fleet.ask("finish")
        if sum(a["received"] for a in warm_result) < warmed["connected"]:
            say(
                f"  warning: warm-up event reached {sum(a['received'] for a in warm_result)} "
                f"of {warmed['connected']}"
            )
        await fleet.ask("close")
        gauge, took = await target.wait_connections(0, 30)
        result["metrics_gauge_found"] = gauge is not None
        if gauge is None:
            say('  warning: no dispatchd_stream_connections{transport="sse"} in /metrics: settling by time')
            await asyncio.sleep(3)
        rss_before = await target.settled_rss()
        say(f"  warm-up done; server RSS {rss_before / 1024:.1f} MiB with no stream")

        # 1. memory
        opened = await connect(target, fleet, list(range(n)), args.concurrency)
        connected = opened["connected"]
        say(
            f"  {connected:,} of {n:,} streams open in {opened['seconds']:.1f} s"
            + (f"; failures {opened['failures']}" if opened["failures"] else "")
        )
        gauge, took = await target.wait_connections(connected, 60)
        if gauge is None:
            await asyncio.sleep(5)
        rss_after = await target.settled_rss()
        result["memory"] = {
            **opened,
            "gauge": gauge,
            "gauge_settled_after_s": round(took, 2),
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "kib_per_connection": round((rss_after - rss_before) / connected, 2) if connected else None,
            "kb_per_connection": round((rss_after - rss_before) * 1.024 / connected, 2)
            if connected
            else None,
        }
        say(
            f"  RSS {rss_before / 1024:.1f} → {rss_after / 1024:.1f} MiB: "
            f"{result['memory']['kib_per_connection']} KiB per stream"
        )
        result["idle"] = await idle_window(target, 5.0 if args.quick else 10.0)
        say(f"  idle with {connected:,} streams: {result['idle']}")

        # 2. fan-out
        result["fanout"] = await fanout(target, fleet, connected, args.fanout)
        f = result["fanout"]
        say(
            f"  fan-out: p50 {ms(f['publish_to_receive']['p50'])}, p99 {ms(f['publish_to_receive']['p99'])}, "
            f"max {ms(f['publish_to_receive']['max'])}; "
            f"{f['delivered']:,}/{f['expected_deliveries']:,} delivered"
        )

        # 3. distinct topics
        result["distinct"] = await distinct(target, fleet, connected, args.rate, args.seconds, args.batch)
        d = result["distinct"]
        say(
            f"  distinct: {d['achieved_rate']:,.0f} events/s; p50 {ms(d['publish_to_receive']['p50'])}, "
            f"p99 {ms(d['publish_to_receive']['p99'])}; {d['delivered']:,}/{d['published']:,} delivered"
        )
        state = await fleet.ask("open")
        result["streams_lost"] = sum(a["lost"] for a in state)
        result["lost_reasons"] = {k: v for a in state for k, v in a["lost_reasons"].items()}
        await fleet.ask("close")
    finally:
        await fleet.stop()
    gauge, took = await target.wait_connections(0, 30)
    result["closed"] = {"gauge": gauge, "after_s": round(took, 2), "rss_kib": rss_kib(target.pid)}

    # 5. client check: the same fan-out, the same connections over twice the processes
    if not args.no_client_check:
        fleet = Fleet("sse", args.procs * 2, params)
        try:
            opened = await connect(target, fleet, list(range(n)), args.concurrency)
            await target.wait_connections(opened["connected"], 60)
            check = await fanout(target, fleet, opened["connected"], args.fanout)
            check["connected"] = opened["connected"]
            result["client_check"] = check
            say(
                f"  client check ({args.procs * 2} processes): p50 {ms(check['publish_to_receive']['p50'])}, "
                f"p99 {ms(check['publish_to_receive']['p99'])}"
            )
            await fleet.ask("close")
        finally:
            await fleet.stop()
        await target.wait_connections(0, 30)

    # 4. the seed's design
    result["polling"] = await polling(target, args)
    p = result["polling"]
    say(
        f"  seed polling: {p['queries_per_s']:,.0f} queries/s; "
        f"noticed p50 {ms(p['publish_to_noticed']['p50'])}, "
        f"p99 {ms(p['publish_to_noticed']['p99'])}"
    )
    return result


# ------------------------------------------------------------------------------------------ report


def rows(r: dict[str, Any], n_label: str) -> list[str]:
    backend = {"sqlite": "SQLite", "postgres": "PostgreSQL"}.get(r["backend"], r["backend"])
    m, f, d, p = r["memory"], r["fanout"], r["distinct"], r["polling"]
    out = []
    ok = m["kb_per_connection"] is not None and m["kb_per_connection"] <= 50
    out.append(
        f"| server RSS per SSE stream, {m['connected']:,} open (of {m['wanted']:,}; opened in "
        f"{m['seconds']:.1f} s) | {backend} | **{m['kb_per_connection']:.1f} kB** "
        f"({m['kib_per_connection']:.1f} KiB): {m['rss_before_kib'] / 1024:.0f} → "
        f"{m['rss_after_kib'] / 1024:.0f} MiB | ≤ 50 KB {'✅' if ok else '❌'} |"
    )
    ps, pc = f["publish_to_receive"], f["created_to_receive"]
    ok = ps["p99"] is not None and ps["p99"] < 0.1 and f["incomplete_events"] == 0
    out.append(
        f"| 1 event fanned out to all {m['connected']:,}, ×{f['events']} | {backend} | publish → receive "
        f"p50 {ms(ps['p50'])}, **p99 {ms(ps['p99'])}**, max {ms(ps['max'])} (from `created_at`: p50 "
        f"{ms(pc['p50'])}, p99 {ms(pc['p99'])}); per event, first stream after "
        f"{ms(f['first_reception']['p50'])}, "
        f"last after {ms(f['last_reception']['p50'])} (median; worst {ms(f['last_reception']['max'])}); "
        f"{f['delivered']:,}/{f['expected_deliveries']:,} delivered; server CPU {f['server_cpu_s']:.2f} s, "
        f"{(f['server_cpu_share_while_fanning_out'] or 0) * 100:.0f} % of a core while fanning out "
        f"| p99 < 100 ms {'✅' if ok else '❌'} |"
    )
    ds, dc = d["publish_to_receive"], d["created_to_receive"]
    out.append(
        f"| {d['published'] / d['publish_seconds']:,.0f} events/s over {m['connected']:,} topics (one stream "
        f"each) for {d['publish_seconds']:.0f} s, batches of {d['batch']} | {backend} | publish → receive "
        f"p50 {ms(ds['p50'])}, **p99 {ms(ds['p99'])}**, max {ms(ds['max'])} (from `created_at`: p50 "
        f"{ms(dc['p50'])}, p99 {ms(dc['p99'])}); {d['delivered']:,}/{d['published']:,} delivered, "
        f"{d['post_errors']} POST errors; POST answered p99 {ms(d['post_answered']['p99'])}; server CPU "
        f"{d['server_cpu_share'] * 100:.0f} % of a core | - |"
    )
    idle = r["idle"]
    tx = idle["db_transactions_per_s"]
    out.append(
        f"| ours, idle: {m['connected']:,} streams open, no event | {backend} | server CPU "
        f"{idle['server_cpu_share'] * 100:.1f} % of a core"
        + (f"; database {tx:,.1f} transactions/s" if tx is not None else "")
        + " | - |"
    )
    pn, pcn = p["publish_to_noticed"], p["created_to_noticed"]
    tx = p["db_transactions_per_s"]
    out.append(
        f"| the seed's design: {p['pollers']:,} clients polling `COUNT(*)` every {p['interval_s']:g} s "
        f"(direct to the database, {p['processes']} processes), {p['published']} events | {backend} | "
        f"**{p['queries_per_s']:,.0f} queries/s** ({p['count_queries_per_s']:,.0f} `COUNT` + fetches of new "
        f"rows)"
        + (
            f", database {tx:,.0f} transactions/s, PostgreSQL CPU "
            f"{p['postgres_cpu_share'] * 100:.0f} % of a core"
            if tx is not None
            else f", pollers' CPU (SQLite in process) {p['poller_cpu_share'] * 100:.0f} % of a core"
        )
        + f"; commit → noticed p50 {ms(pn['p50'])}, **p99 {ms(pn['p99'])}** (from `created_at`: p50 "
        f"{ms(pcn['p50'])}, p99 {ms(pcn['p99'])}) | reference |"
    )
    fc = f["client"]
    check = r.get("client_check")
    per_frame = fc["cpu_per_frame_us"] or 0.0
    text = (
        f"{fc['processes']} client processes used {fc['cpu_share_of_wall'] * 100:.1f} % of their wall time "
        f"in CPU during the fan-out (busiest {fc['busiest_process_cpu_share'] * 100:.1f} %; "
        f"{per_frame:.0f} µs per frame → ≤ {per_frame * m['connected'] / fc['processes'] / 1000:.0f} ms of "
        f"one fan-out's spread per process), loop lag max {ms(fc['loop_lag_max_s'])}"
    )
    if check:
        cs = check["publish_to_receive"]
        text += (
            f"; with {check['client']['processes']} processes: p50 {ms(cs['p50'])}, p99 {ms(cs['p99'])} "
            f"(vs {ms(ps['p50'])}, {ms(ps['p99'])})"
        )
    dcl = d["client"]
    text += (
        f"; distinct topics: clients {dcl['cpu_share_of_wall'] * 100:.1f} % CPU, loop lag max "
        f"{ms(dcl['loop_lag_max_s'])}"
    )
    out.append(f"| client check ({n_label}) | {backend} | {text} | client not the bottleneck |")
    return out


async def run_all(args: argparse.Namespace) -> None:
    limits = raise_nofile()
    say = lambda message: print(message, flush=True)  # noqa: E731
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if args.connections + 200 > limits[0]:
        raise SystemExit(f"open-file limit {limits[0]} too low for {args.connections} connections")
    header = [f"machine: {machine()}"]
    if "postgres" in backends and not args.url:
        header.append(f"PostgreSQL {await postgres_version()} on the same machine")
    header.append(
        f"{os.cpu_count()} cores shared by the server, the database and {args.procs} client processes "
        f"(open-file limit {limits[0]}); load average before: {load_average()}"
    )
    header.append(f"code: {ROOT} @ {git('rev-parse', '--short', 'HEAD') or '?'}")
    for line in header:
        say(line)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-realtime-") as folder:
        for backend in backends:
            say(f"\n{backend}: {args.connections:,} connections, {args.procs} client processes")
            async with AsyncExitStack() as stack:
                if args.url:
                    target = Target(args.url, args.pid, args.database_url, args.key, backend)
                else:
                    target = await stack.enter_async_context(served(backend, Path(folder)))
                target.http = await stack.enter_async_context(
                    aiohttp.ClientSession(
                        target.base,
                        headers={"Authorization": f"Bearer {target.key}"},
                        connector=aiohttp.TCPConnector(limit=50, keepalive_timeout=2),  # below uvicorn's 5 s
                        timeout=aiohttp.ClientTimeout(total=60),
                    )
                )
                try:
                    results.append(await measure(target, args, say))
                finally:
                    log = getattr(target, "log_path", None)
                    if log and log.exists():
                        problems = [
                            line for line in log.read_text(errors="replace").splitlines()
                            if '"error"' in line or '"critical"' in line or "Traceback" in line
                        ]  # fmt: skip
                        if problems:
                            say(f"  server log: {len(problems)} error lines, e.g. {problems[0][:400]}")
    label = f"{args.procs} processes"
    say("\nload average after: " + load_average())
    say("")
    for line in header:
        say(line if not line.startswith("code:") else line)
    say("")
    say("| benchmark | backend | result | goal |")
    say("|---|---|---|---|")
    for r in results:
        for line in rows(r, label):
            say(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "meta": {
                        "benchmark": "bench.bench_realtime",
                        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        "machine": machine(),
                        "header": header,
                        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    },
                    "results": results,
                },
                indent=2,
                default=lambda value: list(value) if not isinstance(value, str) else value,
            )
        )
        say(f"figures written to {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--quick", action="store_true", help="1,000 connections and short phases")
    parser.add_argument("--connections", type=int, help="SSE streams (default 10,000; --quick 1,000)")
    parser.add_argument("--procs", type=int, default=4, help="client processes holding the streams")
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight per client process")
    parser.add_argument(
        "--fanout", type=int, help="events fanned out to every stream (default 10; --quick 5)"
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s over distinct topics")
    parser.add_argument("--seconds", type=float, help="seconds of distinct-topic events (15; --quick 5)")
    parser.add_argument("--batch", type=int, default=50, help="events per POST /v1/events")
    parser.add_argument("--pollers", type=int, default=1000, help="simulated clients of the seed's loop")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between a poller's COUNTs")
    parser.add_argument("--poll-seconds", type=float, help="seconds of polling (30; --quick 8)")
    parser.add_argument("--poll-rate", type=float, default=50.0, help="events/s published while polling")
    parser.add_argument("--poll-pool", type=int, default=10, help="PostgreSQL connections per poller process")
    parser.add_argument("--no-client-check", action="store_true", help="skip the fan-out over 2× processes")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid (RSS, CPU)")
    parser.add_argument("--database-url", help="with --url: its DISPATCHD_DATABASE_URL (for the pollers)")
    parser.add_argument("--key", default=ADMIN_KEY, help="with --url: a staff API key")
    args = parser.parse_args()
    if args.url and (args.pid is None or args.database_url is None or args.backend == "both"):
        parser.error("--url needs --pid, --database-url and one --backend")
    args.connections = args.connections or (1000 if args.quick else 10_000)
    args.fanout = args.fanout or (5 if args.quick else 10)
    args.seconds = args.seconds or (5.0 if args.quick else 15.0)
    args.poll_seconds = args.poll_seconds or (8.0 if args.quick else 30.0)
    asyncio.run(run_all(args))


if __name__ == "__main__":
    main()
