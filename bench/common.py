"""Shared benchmark helpers: the machine we ran on, fresh databases, a server subprocess."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from dispatchd.core.db import Database
from dispatchd.migrate import upgrade

POSTGRES_URL = os.environ.get(
    "DISPATCHD_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def machine() -> str:
    """One line describing the machine: CPU model, cores, memory, Python, SQLite."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        memory = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        memory = "?"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


async def postgres_version() -> str:
    engine = create_async_engine(POSTGRES_URL)
    try:
        async with engine.connect() as connection:
            return (await connection.scalar(text("SHOW server_version"))).split()[0]
    finally:
        await engine.dispose()


@asynccontextmanager
async def fresh_database(backend: str):
    """Yield the URL of a new, migrated database (``sqlite`` file in a temp dir, or ``postgres``)."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite+aiosqlite:///{folder}/bench.db"
            db = Database(url)
            await upgrade(db)
            await db.dispose()
            yield url
        return
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"dispatchd_bench_{uuid.uuid4().hex[:8]}"
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    db = Database(url)
    await upgrade(db)
    await db.dispose()
    try:
        yield url
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant (``serve --workers N`` forks), read
    from ``/proc``; 0.0 for a process that is gone. Divide a delta by the operations it served to get the
    server CPU time per operation, the figure that stays stable on a noisy machine."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu.get(member, 0.0) for member in tree)


class CpuMeter:
    """Server CPU time over a window: ``meter = CpuMeter(pid)``, work, ``meter.per_operation(n)`` → ms of
    CPU per operation (the processes' user + system time delta ÷ ``n``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = process_tree_cpu_s(pid)

    def seconds(self) -> float:
        return process_tree_cpu_s(self.pid) - self.start

    def per_operation(self, operations: int) -> float | None:
        """Milliseconds of server CPU per operation, or None when nothing was done."""
        return self.seconds() * 1000 / operations if operations else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerURL(str):
    """The base URL of a served process, carrying its ``pid`` (for :class:`CpuMeter`)."""

    pid: int

    def __new__(cls, url: str, pid: int) -> ServerURL:
        value = super().__new__(cls, url)
        value.pid = pid
        return value


@contextmanager
def server(database_url: str, admin_key: str, **settings: str):
    """Run ``dispatchd serve`` in its own process until ready; yield its base URL (a :class:`ServerURL`)."""
    port = free_port()
    env = {
        **os.environ,
        "DISPATCHD_DATABASE_URL": database_url,
        "DISPATCHD_ADMIN_API_KEY": admin_key,
        "DISPATCHD_LOG_LEVEL": "WARNING",
        **{f"DISPATCHD_{k.upper()}": v for k, v in settings.items()},
    }
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatchd", "serve", "--port", str(port)], env=env, stdout=log, stderr=log
        )
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited: {log.read()[-2000:]}")
                time.sleep(0.1)
            yield ServerURL(base, process.pid)
        finally:
            process.terminate()
            process.wait(timeout=20)


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def run(main) -> None:
    asyncio.run(main())
