"""The seed's stack in ``bench.bench_notifications``: a Celery worker (``bench/celery_baseline.py``) on
Redis, fed one task per message, killed and restarted like dispatchd's server."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from bench.notifications_outcome import Outcome, celery_pool, scenario
from bench.notifications_procs import (
    PHONE_NUMBER_ID,
    CpuAcrossRestarts,
    run_folder,
    shutdown,
    sigkill,
    spawn,
    wait_for,
)

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")


class CeleryWorker:
    def __init__(self, fake_url: str, args: argparse.Namespace, logs: Path) -> None:
        self.args = args
        self.logs = logs
        self.fake_url = fake_url
        self.process: subprocess.Popen | None = None
        self.started = 0

    async def start(self) -> None:
        self.started += 1
        log = self.logs / f"celery-{self.started}.log"
        ready = self.logs / f"celery-{self.started}.ready"
        pool = ["-P", "threads"] if self.args.celery_pool == "threads" else ["-P", "prefork"]
        concurrency = self.args.concurrency if self.args.celery_pool == "threads" else self.args.processes
        command = [
            sys.executable, "-m", "celery", "-A", "bench.celery_baseline", "worker", *pool,
            "--concurrency", str(concurrency), "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"bench{self.started}@%h",
        ]  # fmt: skip
        env = {
            "BENCH_CELERY_BROKER": REDIS_URL,
            "BENCH_FAKE_WHATSAPP_URL": f"{self.fake_url}/v21.0",
            "BENCH_WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID,
            "BENCH_CELERY_READY_FILE": str(ready),
        }
        self.process = spawn(command, log, env)

        async def is_ready() -> bool:
            return ready.exists()

        await wait_for(is_ready, 60, "celery worker", self.process, log)


async def run_celery(fake: httpx.AsyncClient, args: argparse.Namespace, kill: bool, logs: Path) -> Outcome:
    import redis

    os.environ["BENCH_CELERY_BROKER"] = REDIS_URL  # read when bench.celery_baseline is imported
    from bench.celery_baseline import send_notification

    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    await fake.post("/reset")
    logs = run_folder(logs, "celery", kill)
    workers = CeleryWorker(str(fake.base_url).rstrip("/"), args, logs)
    await workers.start()

    def held() -> tuple[int, int]:
        """(messages waiting in the queue, messages delivered to a worker and not acknowledged)."""
        return broker.llen("celery"), broker.hlen("unacked")

    cpu = CpuAcrossRestarts()
    try:
        ids = [f"ntf_{uuid.uuid4().hex}" for _ in range(args.messages)]
        started = time.time()
        cpu.start(workers.process.pid)

        def enqueue() -> None:
            for i, nid in enumerate(ids):
                send_notification.delay(nid, f"+22170{i:07d}", f"Nouvelle course #{i}: 12 000 FCFA")

        enqueued = asyncio.create_task(asyncio.to_thread(enqueue))
        outcome = Outcome("Celery + Redis", scenario(kill, args), args.messages, started, ids)
        deadline = time.monotonic() + args.timeout
        killed = False
        empty_since: float | None = None
        while time.monotonic() < deadline:
            unique = (await fake.get("/stats")).json()["unique"]
            cpu.observe(unique, args.messages)
            if kill and not killed and unique >= args.kill_at * args.messages:
                cpu.stop()
                sigkill(workers.process)
                killed = True
                outcome.in_flight_at_kill = held()[1]
                await workers.start()
                cpu.start(workers.process.pid)
            if enqueued.done() and held() == (0, 0):
                # Redis holds nothing: done, or (if ids are missing) nothing will ever send them; a message
                # between BRPOP and the unacked set is invisible for an instant, hence the grace period
                empty_since = empty_since or time.monotonic()
                if unique >= args.messages or time.monotonic() - empty_since > 3:
                    outcome.finished = True
                    break
            else:
                empty_since = None
            await asyncio.sleep(0.05)
        outcome.cpu_s = cpu.stop()
        outcome.window_cpu_ms = cpu.window_ms_per_message()
        await enqueued
        outcome.stats = (await fake.get("/stats", params={"ids": 1, "times": 1})).json()
        waiting, unacked = held()
        if waiting or unacked:
            outcome.notes.append(f"still held by Redis: {waiting} queued, {unacked} unacked")
        outcome.notes.append(f"pool {celery_pool(args)}")
        return outcome
    finally:
        if workers.process is not None:
            shutdown(workers.process)
        broker.flushdb()
        broker.close()
