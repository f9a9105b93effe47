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

from bench.common import CpuMeter

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


class MultiMeter:
    """:class:`bench.common.CpuMeter` over several process trees (``serve`` and ``worker``)."""

    def __init__(self, pids: list[int]) -> None:
        self.meters = [CpuMeter(pid) for pid in pids]

    def seconds(self) -> float:
        return sum(meter.seconds() for meter in self.meters)


class CpuAcrossRestarts:
    """Server CPU seconds of one system over a run, across the restart after a kill: ``start(pids)`` after
    each (re)start (every process tree the system runs), ``stop()`` just before a kill or at the end (a
    killed process's CPU can no longer be read, so it is banked first)."""

    def __init__(self) -> None:
        self.banked = 0.0
        self.meter: MultiMeter | None = None
        self.marks: dict[float, tuple[int, float]] = {}

    def start(self, pids: int | list[int]) -> None:
        self.meter = MultiMeter([pids] if isinstance(pids, int) else pids)

    def stop(self) -> float:
        if self.meter is not None:
            self.banked += self.meter.seconds()
            self.meter = None
        return self.banked

    def total(self) -> float:
        """CPU seconds so far (banked, plus the running process's)."""
        return self.banked + (self.meter.seconds() if self.meter is not None else 0.0)

    def observe(self, delivered: int, messages: int) -> None:
        """Called as the run goes with the distinct ids delivered so far: notes the CPU when 10 % and 70 %
        of ``messages`` were delivered (the sustained window, without start-up and the retry tail)."""
        marks = self.marks
        for share in (0.1, 0.7):
            if share not in marks and delivered >= share * messages:
                marks[share] = (delivered, self.total())

    def window_ms_per_message(self) -> float | None:
        """Server CPU milliseconds per message delivered between the 10 % and 70 % marks."""
        marks = self.marks
        if 0.1 not in marks or 0.7 not in marks or marks[0.7][0] <= marks[0.1][0]:
            return None
        (low_n, low_s), (high_n, high_s) = marks[0.1], marks[0.7]
        return (high_s - low_s) * 1000 / (high_n - low_n)


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
