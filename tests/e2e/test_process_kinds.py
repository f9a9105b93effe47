"""The process kinds of issue 11, as real processes: ``dispatchd serve --workers N`` (uvicorn's supervisor,
one port), ``dispatchd serve --no-delivery`` beside ``dispatchd worker --processes M``, and the SQLite rule
(several processes refused, exit 2, one line naming the fix).

PostgreSQL tests reset the session's database; the fake WhatsApp Cloud API
(:mod:`dispatchd.testing.fake_whatsapp`) records every message it accepted by notification id. Start-up
of spawned processes is slow on a busy machine: every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from dispatchd.core.db import Database
from dispatchd.notifications import outbox
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus
from dispatchd.notifications.outbox import Message
from tests.conftest import ADMIN_KEY, free_port, reset_postgres
from tests.factories import post_resource
from tests.prom import sample

ROOT = Path(__file__).resolve().parents[2]
START_S = 120  # spawned processes import everything again: slow when the machine is busy
STOP_S = 30


# ----------------------------------------------------------------------------------------------- helpers


def start(
    command: list[str], output: Path, env: dict[str, str], module: str = "dispatchd", preexec_fn=None
) -> subprocess.Popen:
    """Start ``python -m dispatchd …``; its output goes to a file (a pipe would fill and block it)."""
    with output.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, *command],
            cwd=ROOT,
            env={**os.environ, "DISPATCHD_LOG_JSON": "true", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )


def open_files_limit(pid: int) -> tuple[int, int]:
    """``(soft, hard)`` RLIMIT_NOFILE of a live process, from ``/proc/<pid>/limits``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for {pid}")


def low_soft_file_limit() -> None:
    """In the child before exec: a soft open-file limit of 256, below the hard one."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=15)


def terminate(process: subprocess.Popen, output: Path) -> int:
    """SIGTERM, then the exit status (within :data:`STOP_S`)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit {STOP_S} s after SIGTERM:\n{output.read_text()[-3000:]}") from None


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free (``--metrics-port P`` of two worker processes)."""
    while True:
        port = free_port()
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def tail(output: Path) -> str:
    return output.read_text()[-3000:]


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``: pid → command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            found[int(entry.name)] = command
    return found


def spawned(pid: int) -> set[int]:
    """The children of ``pid`` started by multiprocessing's ``spawn`` (not its resource tracker)."""
    return {child for child, command in children(pid).items() if "spawn_main" in command}


async def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_ready(base: str, process: subprocess.Popen, output: Path) -> None:
    async def ready() -> bool:
        assert process.poll() is None, tail(output)
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(f"{base}/ready")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_until(ready, START_S, f"{base}/ready", interval_s=0.2)


async def statuses(db: Database) -> dict[str, int]:
    async with db.read() as session:
        rows = await session.execute(select(Notification.status, func.count()).group_by(Notification.status))
        return {status: count for status, count in rows.all()}


def logged(output: Path, message: str) -> list[dict]:
    """The JSON log lines of ``output`` whose event is ``message``."""
    found = []
    for line in output.read_text().splitlines():
        if line.startswith("{") and f'"event": "{message}"' in line:
            found.append(json.loads(line))
    return found


# ----------------------------------------------------------------------------------- serve --workers 2


@pytest.mark.postgres
async def test_serve_workers_answers_from_two_processes_sells_capacity_once_and_stops_on_sigterm(
    postgres_url, tmp_path
):
    await reset_postgres(postgres_url)
    port, output = free_port(), tmp_path / "serve.log"
    env = {
        "DISPATCHD_DATABASE_URL": postgres_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_WORKERS": "2",  # the environment variable, as the systemd unit sets it
        "DISPATCHD_RATE_LIMIT": "",
        "DISPATCHD_HEADER_TIMEOUT_S": "1",
    }
    server = start(["serve", "--port", str(port)], output, env, preexec_fn=low_soft_file_limit)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, server, output)
        workers = await wait_until(
            lambda: asyncio.sleep(0, spawned(server.pid) if len(spawned(server.pid)) == 2 else None),
            START_S,
            "two server processes",
        )

        async def health_pid() -> int:
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:  # a new connection each
                return (await http.get("/health")).json()["pid"]

        async def both_answered() -> set[int] | None:
            pids = set(await asyncio.gather(*(health_pid() for _ in range(20))))
            both_answered.seen |= pids
            return both_answered.seen if both_answered.seen == workers else None

        both_answered.seen = set()
        assert await wait_until(both_answered, 60, "answers from both processes") == workers
        assert server.pid not in workers  # the supervisor answers nothing itself
        # What `serve` does before serving applies in each process: the file limit raised to the hard one…
        assert open_files_limit(server.pid)[0] == 256  # what they inherited from the supervisor
        for pid in workers:
            soft, hard = open_files_limit(pid)
            assert soft == hard > 256, (pid, soft, hard)

        async def silent_connection() -> bytes:  # …and the header timeout (1 s here) closes silent sockets
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return await asyncio.wait_for(reader.read(), timeout=10)
            finally:
                writer.close()

        assert await asyncio.gather(*(silent_connection() for _ in range(8))) == [b""] * 8

        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
            resource_id = await post_resource(http, capacity=10)

        async def reserve(i: int) -> int:
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
                answer = await http.post(
                    "/v1/reservations",
                    json={"resource_id": resource_id, "client_id": f"+2217700{i:05d}", "quantity": 1},
                )
                assert answer.status_code in (201, 409), answer.text
                assert answer.status_code == 201 or answer.json()["code"] == "RESOURCE_FULL", answer.text
                return answer.status_code

        codes = await asyncio.gather(*(reserve(i) for i in range(50)))
        assert (codes.count(201), codes.count(409)) == (10, 40)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
            resource = (await http.get(f"/v1/resources/{resource_id}")).json()
        assert resource["reserved"] == 10

        assert terminate(server, output) == 0
        assert not alive(workers)
        started = logged(output, "dispatchd started")
        assert {line["pid"] for line in started} == workers
        assert all("delivery" in line["loops"] for line in started)  # --delivery by default
        assert len(logged(output, "dispatchd stopped")) == 2  # each child ran its lifespan to the end
    finally:
        stop(server)


# ---------------------------------------------------- serve --no-delivery + dispatchd worker --processes 2


@pytest.mark.postgres
async def test_workers_deliver_every_message_once_and_a_killed_child_loses_nothing(postgres_url, tmp_path):
    await reset_postgres(postgres_url)
    fake_port, serve_port = free_port(), free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = {
        "DISPATCHD_DATABASE_URL": postgres_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_NOTIFICATION_CHANNEL": "whatsapp_cloud",
        "DISPATCHD_WHATSAPP_API_BASE_URL": f"{fake_url}/v21.0",
        "DISPATCHD_WHATSAPP_ACCESS_TOKEN": "fake-token",
        "DISPATCHD_WHATSAPP_PHONE_NUMBER_ID": "1234567890",
        "DISPATCHD_RECIPIENT_INTERVAL_S": "0",
        "DISPATCHD_CHANNEL_RATE": "",  # no drain limit
        "DISPATCHD_DELIVERY_LEASE_S": "2",
        "DISPATCHD_DELIVERY_CONCURRENCY": "10",
    }
    processes: list[subprocess.Popen] = []
    db = Database(postgres_url)
    fake_log, serve_log, worker_log = tmp_path / "fake.log", tmp_path / "serve.log", tmp_path / "worker.log"
    try:
        fake = start(
            ["--port", str(fake_port), "--latency-ms", "100"], fake_log, {}, "dispatchd.testing.fake_whatsapp"
        )
        processes.append(fake)
        server = start(["serve", "--port", str(serve_port), "--no-delivery"], serve_log, env)
        processes.append(server)
        await wait_ready(f"http://127.0.0.1:{serve_port}", server, serve_log)
        [started] = logged(serve_log, "dispatchd started")
        assert "delivery" not in started["loops"] and "sweeper" in started["loops"], started

        metrics_port = free_port_pair()
        worker = start(["worker", "--processes", "2", "--metrics-port", str(metrics_port)], worker_log, env)
        processes.append(worker)

        async def two_started() -> bool:
            assert worker.poll() is None, tail(worker_log)
            return len(logged(worker_log, "dispatchd worker started")) == 2

        await wait_until(two_started, START_S, "two worker processes", interval_s=0.2)
        for line in logged(worker_log, "dispatchd worker started"):
            assert line["loops"] == "['alerts', 'delivery']" and line["channel"] == "whatsapp_cloud", line

        async with httpx.AsyncClient(base_url=fake_url, timeout=10) as http:

            async def enqueue(n: int, first: int) -> list[str]:
                async with db.transaction() as session:
                    return await outbox.enqueue(
                        session,
                        [
                            Message(recipient=f"+22170{i:07d}", category="information", body=f"message {i}")
                            for i in range(first, first + n)
                        ],
                    )

            async def all_final() -> dict[str, int] | None:
                assert worker.poll() is None, tail(worker_log)
                counts = await statuses(db)
                return counts if not any(counts.get(s, 0) for s in OPEN_STATUSES) else None

            # 1. Two processes share the outbox: every message once.
            calm = await enqueue(200, 0)
            assert await wait_until(all_final, 60, "200 messages sent") == {NotificationStatus.SENT: 200}
            stats = (await http.get("/stats", params={"ids": 1})).json()
            assert set(stats["counts"]) == set(calm)  # none lost
            assert stats["duplicates"] == 0 and set(stats["counts"].values()) == {1}
            sent_by = [  # process i's counters on --metrics-port + i
                sample(
                    (await http.get(f"http://127.0.0.1:{metrics_port + i}/metrics")).text,
                    "dispatchd_notifications_total",
                    channel="whatsapp_cloud",
                    outcome="sent",
                )
                for i in (0, 1)
            ]
            assert sum(sent_by) == 200 and all(sent_by), sent_by  # both processes took a share

            # 2. SIGKILL one child mid-batch: its claimed rows come back after their lease; none lost.
            before = set(stats["counts"])
            stormy = await enqueue(300, 200)
            victims = spawned(worker.pid)
            assert len(victims) == 2

            async def mid_batch() -> dict[str, int] | None:
                counts = await statuses(db)
                sent = counts.get("SENT", 0)
                return counts if counts.get("SENDING", 0) and 260 <= sent < 500 else None

            await wait_until(mid_batch, 60, "a batch in flight", interval_s=0.01)
            victim = min(victims)
            os.kill(victim, signal.SIGKILL)
            at_kill = await statuses(db)
            replaced = await wait_until(
                lambda: asyncio.sleep(0, (spawned(worker.pid) - victims) or None), START_S, "a new child"
            )
            assert len(replaced) == 1 and len(spawned(worker.pid)) == 2
            final = await wait_until(all_final, 90, "every message in a final state", interval_s=0.1)
            stats = (await http.get("/stats", params={"ids": 1})).json()
            print(f"\nat the kill: {at_kill}; final: {final}; fake: {stats['delivered']} delivered")

        assert final == {NotificationStatus.SENT: 500}
        counts: dict[str, int] = stats["counts"]
        assert set(counts) == before | set(stormy)  # nothing lost
        duplicated = {nid for nid, n in counts.items() if n > 1}
        assert duplicated <= set(stormy)  # at least once: only rows in flight at the kill may repeat
        assert len(duplicated) <= at_kill.get("SENDING", 0)
        [died] = logged(
            worker_log,
            "worker process died; starting another (its claimed messages return when their lease ends)",
        )
        assert (died["pid"], died["exitcode"]) == (victim, -signal.SIGKILL)

        last = spawned(worker.pid)
        assert terminate(worker, worker_log) == 0
        assert not alive(last)
        assert len(logged(worker_log, "dispatchd worker stopped")) == 3  # two children and the parent
        assert terminate(server, serve_log) == -signal.SIGTERM  # one process: uvicorn re-raises it
    finally:
        for process in reversed(processes):
            stop(process)
        await db.dispose()


@pytest.mark.postgres
async def test_one_worker_process_says_what_it_runs_and_stops_on_sigterm_with_0(postgres_url, tmp_path):
    output = tmp_path / "worker.log"
    worker = start(["worker"], output, {"DISPATCHD_DATABASE_URL": postgres_url})
    try:

        async def started() -> list[dict]:
            assert worker.poll() is None, tail(output)
            return logged(output, "dispatchd worker started")

        [line] = await wait_until(started, START_S, "the worker", interval_s=0.1)
        assert (line["pid"], line["process"], line["loops"]) == (worker.pid, 0, "['alerts', 'delivery']")
        assert not spawned(worker.pid)  # one process: no supervisor, no child
        assert terminate(worker, output) == 0
        assert len(logged(output, "dispatchd worker stopped")) == 1
    finally:
        stop(worker)


# ----------------------------------------------------------------------------------------- SQLite rule


def test_sqlite_refuses_several_processes_with_one_line_and_exit_2(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/one.db"
    cases = {
        "serve --workers 2": (["serve", "--workers", "2"], {}),
        "DISPATCHD_WORKERS=3": (["serve"], {"DISPATCHD_WORKERS": "3"}),
        "serve --no-delivery": (["serve", "--no-delivery"], {}),
        "worker": (["worker", "--processes", "2"], {}),
    }
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "dispatchd", *command],
            cwd=tmp_path,
            env={**os.environ, "DISPATCHD_DATABASE_URL": url, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (command, extra) in cases.items()
    }
    for name, run in runs.items():
        out, err = run.communicate(timeout=60)
        assert run.returncode == 2, (name, out, err)
        assert out == "" and len(err.splitlines()) == 1, (name, err)
        assert "needs PostgreSQL" in err and "DISPATCHD_DATABASE_URL=postgresql+asyncpg://" in err, err
    assert not (tmp_path / "one.db").exists()  # refused before opening anything
