"""Processes for ``bench.bench_notifications``: each run's log folder, a process group started, killed
(SIGKILL) or shut down (SIGTERM, then SIGKILL), and waiting until a process is ready."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PHONE_NUMBER_ID = "1234567890"  # the sender both systems use at the fake WhatsApp


def run_folder(logs: Path, system: str, kill: bool) -> Path:
    """A folder of its own for one run's logs (and Celery's ready files)."""
    folder = logs / f"{system}-{'kill' if kill else 'undisturbed'}"
    folder.mkdir()
    return folder


def spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``command`` in its own process group (so a kill reaches its children too)."""
    with log.open("a") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def sigkill(process: subprocess.Popen) -> None:
    """SIGKILL the process group we started (pgid = the process's pid)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def shutdown(process: subprocess.Popen, timeout_s: float = 20) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        sigkill(process)
    except ProcessLookupError:
        process.wait(timeout=5)


def tail(log: Path) -> str:
    return log.read_text()[-2000:]


async def wait_for(check, timeout_s: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if process.poll() is not None:
            raise RuntimeError(f"{what}: process exited: {tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout_s:g} s: {tail(log)}")
        await asyncio.sleep(0.05)


async def http_ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1) as http:
            return (await http.get(url)).status_code == 200
    except httpx.TransportError:
        return False
