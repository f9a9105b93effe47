"""The load side of ``bench.bench_realtime``: SSE client processes and the seed's ``COUNT(*)`` pollers.

Each client process (``python -m bench.realtime_load``) runs one asyncio event loop (uvloop when
installed) that holds its share of the connections as raw :class:`asyncio.Protocol` objects: the
HTTP/1.1 ``GET`` is written by hand, the answer's chunked body is decoded and split into SSE frames by
hand, and a frame is only timestamped (``time.time()`` in ``data_received``, before any parsing) and kept
as bytes while a phase runs; JSON is parsed when the phase ends, so it adds nothing to the latencies.
The same processes report their CPU time, their wall time and their event loop's lag (a 10 ms sleep's
overshoot) per phase: the evidence that the client kept up.

A poller process emulates the seed's Laravel SSE loop without HTTP: each simulated client runs
``SELECT COUNT(*) FROM events WHERE topic = $1`` every ``interval`` seconds (first tick at a random phase)
directly against the server's database and, when the count changed, ``SELECT`` the new rows (what the
loop then pushed), noting when it saw each one.

The parent drives its processes through :class:`Fleet` (one pipe each; one command at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import sqlite3
import subprocess
import sys
import time
from array import array
from collections import Counter
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def raise_nofile() -> tuple[int, int]:
    """Raise this process's open-file limit to its hard limit (inherited by the processes it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _timestamp(iso: str) -> float:
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_frame(frame: bytes) -> tuple[int | None, str | None, dict[str, Any] | None]:
    """``id``, ``event`` and the JSON ``data`` of one SSE frame (lines joined per the SSE rules)."""
    event_id = event = None
    data: list[str] = []
    for raw in frame.replace(b"\r\n", b"\n").split(b"\n"):
        line = raw.decode()
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = int(value)
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return event_id, event, (json.loads("\n".join(data)) if data else None)


# ------------------------------------------------------------------------------------------ SSE clients

_HEAD, _SIZE, _CHUNK, _BODY, _DONE = range(5)


class SSEClient(asyncio.Protocol):
    """One SSE connection: HTTP/1.1 by hand, chunked decoding, frames kept as ``(time, bytes)``."""

    __slots__ = ("worker", "request", "transport", "state", "raw", "need", "text", "sep", "ready", "lost")

    def __init__(self, worker: SSEWorker, request: bytes) -> None:
        self.worker = worker
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.raw = bytearray()
        self.need = 0
        self.text = b""
        self.sep: bytes | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.lost = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.worker.on_lost(self, exc)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the headers: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.state == _HEAD:
            self.raw += data
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.raw[:end])
            data = bytes(self.raw[end + 4 :])
            self.raw = bytearray()
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                self.state = _DONE
                self.ready.set_exception(ConnectionError(f"HTTP {status}: {head[:300]!r} {data[:300]!r}"))
                self.transport.close()
                return
            self.state = _SIZE if b"transfer-encoding: chunked" in head.lower() else _BODY
            self.ready.set_result(now)
            if not data:
                return
        if self.state == _BODY:
            self.frames(data, now)
            return
        if self.state == _DONE:
            return
        raw = self.raw
        raw += data
        parts = []
        pos = 0
        while True:
            if self.state == _SIZE:
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(bytes(raw[pos:end]).split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self.state = _DONE
                    break
                self.need = size
                self.state = _CHUNK
            else:
                if len(raw) - pos < self.need + 2:
                    break
                parts.append(bytes(raw[pos : pos + self.need]))
                pos += self.need + 2
                self.state = _SIZE
        del raw[:pos]
        if parts:
            self.frames(b"".join(parts), now)

    def frames(self, payload: bytes, now: float) -> None:
        if self.sep is None:
            self.sep = b"\r\n\r\n" if b"\r\n" in payload else b"\n\n"
        buffer = self.text + payload if self.text else payload
        sep, step, start = self.sep, len(self.sep), 0
        worker = self.worker
        while True:
            end = buffer.find(sep, start)
            if end < 0:
                break
            frame = buffer[start:end]
            start = end + step
            if b"data:" in frame:
                worker.frames.append((now, frame))
                worker.events += 1
            elif frame.startswith(b":"):
                worker.pings += 1
        self.text = buffer[start:]


class SSEWorker:
    """The event loop of one client process: its connections, its phases, its commands."""

    def __init__(self, pipe, params: dict[str, Any]) -> None:
        self.pipe = pipe
        self.params = params
        self.clients: list[SSEClient] = []
        self.frames: list[tuple[float, bytes]] = []
        self.events = 0
        self.pings = 0
        self.lost = 0
        self.lost_reasons: Counter = Counter()
        self.lags: array = array("d")
        self.stopped: asyncio.Future | None = None
        self.phase: dict[str, float] = {}
        self.closing = False

    # -------------------------------------------------------------------------------- plumbing
    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        loop.add_reader(self.pipe.fileno(), self.on_command)
        os.set_blocking(self.pipe.fileno(), True)  # the loop made it non-blocking; replies can be large
        lag_task = asyncio.create_task(self.watch_lag())
        try:
            await self.stopped
        finally:
            lag_task.cancel()
            loop.remove_reader(self.pipe.fileno())

    def on_command(self) -> None:
        try:
            message = self.pipe.recv()
        except EOFError:  # the parent is gone
            self.close_all()
            if not self.stopped.done():
                self.stopped.set_result(None)
            return
        asyncio.get_running_loop().create_task(self.answer(message))

    async def answer(self, message: tuple) -> None:
        name, *args = message
        try:
            reply = await getattr(self, f"cmd_{name}")(*args)
        except Exception as error:  # reported to the parent, which raises
            reply = {"error": f"{type(error).__name__}: {error}"}
        self.pipe.send(reply)

    async def watch_lag(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - started - 0.01)

    def on_lost(self, client: SSEClient, exc) -> None:
        if not self.closing and client.state != _HEAD:
            self.lost += 1
            self.lost_reasons[repr(exc)[:120]] += 1

    def close_all(self) -> None:
        self.closing = True
        for client in self.clients:
            if client.transport is not None:
                client.transport.close()

    # -------------------------------------------------------------------------------- commands
    async def cmd_connect(self, indices: list[int], concurrency: int, timeout_s: float) -> dict[str, Any]:
        """Open one stream per index (``topic=<all>&topic=<prefix><index>``), ``concurrency`` at a time."""
        p = self.params
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        failures: Counter = Counter()
        times: list[float] = []

        async def one(index: int) -> None:
            query = "&".join(f"topic={topic}" for topic in (p["all_topic"], f"{p['topic_prefix']}{index}"))
            request = (
                f"GET {p['path']}?{query} HTTP/1.1\r\nHost: {p['host']}:{p['port']}\r\n"
                f"Authorization: Bearer {p['key']}\r\nAccept: text/event-stream\r\n"
                "Cache-Control: no-cache\r\n\r\n"
            ).encode()
            async with gate:
                for attempt in range(3):
                    started = time.perf_counter()
                    try:
                        _, client = await asyncio.wait_for(
                            loop.create_connection(lambda: SSEClient(self, request), p["host"], p["port"]),
                            timeout_s,
                        )
                        await asyncio.wait_for(client.ready, timeout_s)
                    except (OSError, TimeoutError, ConnectionError) as error:
                        failures[f"{type(error).__name__}: {str(error)[:200]}"] += 1
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    times.append(time.perf_counter() - started)
                    self.clients.append(client)
                    return

        started = time.perf_counter()
        await asyncio.gather(*(one(index) for index in indices))
        return {
            "connected": len(times),
            "wanted": len(indices),
            "failures": dict(failures),
            "seconds": time.perf_counter() - started,
            "connect_times": times,
        }

    async def cmd_open(self) -> dict[str, Any]:
        alive = sum(1 for client in self.clients if not client.lost)
        return {"open": alive, "lost": self.lost, "lost_reasons": dict(self.lost_reasons)}

    async def cmd_start(self) -> dict[str, Any]:
        """Begin a phase: forget the frames seen so far, start the CPU / wall / lag accounting."""
        self.frames = []
        self.events = 0
        self.lags = array("d")
        self.phase = {"cpu": time.process_time(), "wall": time.perf_counter(), "pings": self.pings}
        return {"ok": True}

    async def cmd_count(self) -> int:
        return self.events

    async def cmd_finish(self) -> dict[str, Any]:
        """End a phase: parse the frames kept and return the latencies and the ids received."""
        cpu = time.process_time() - self.phase["cpu"]
        wall = time.perf_counter() - self.phase["wall"]
        lags = sorted(self.lags)
        frames, self.frames = self.frames, []
        by_sent, by_created, order = array("d"), array("d"), array("q")
        ids: Counter = Counter()
        bad = 0
        for received, frame in frames:
            try:
                event_id, _, body = parse_frame(frame)
                by_sent.append(received - float(body["data"]["sent_at"]))
                by_created.append(received - _timestamp(body["created_at"]))
                order.append(event_id)
                ids[event_id] += 1
            except (ValueError, KeyError, TypeError):
                bad += 1
        return {
            "received": len(frames),
            "unparsed": bad,
            "by_sent": by_sent,
            "by_created": by_created,
            "event_ids": order,  # the event of each latency above
            "ids": ids,
            "cpu_s": cpu,
            "wall_s": wall,
            "parse_cpu_s": time.process_time() - self.phase["cpu"] - cpu,
            "lag_p99_s": lags[int(len(lags) * 0.99)] if lags else 0.0,
            "lag_max_s": lags[-1] if lags else 0.0,
            "pings": self.pings - int(self.phase["pings"]),
            "lost": self.lost,
        }

    async def cmd_close(self) -> dict[str, Any]:
        self.close_all()
        await asyncio.sleep(0.2)
        closed, self.clients, self.closing = len(self.clients), [], False
        return {"closed": closed}

    async def cmd_stop(self) -> dict[str, Any]:
        self.close_all()
        asyncio.get_running_loop().call_later(0.2, self.stopped.set_result, None)
        return {"stopped": True}


# ------------------------------------------------------------------------------------------ pollers


class PollWorker(SSEWorker):
    """Simulated clients of the seed's SSE loop: ``COUNT(*)`` of their topic every ``interval`` seconds."""

    def __init__(self, pipe, params: dict[str, Any]) -> None:
        super().__init__(pipe, params)
        self.tasks: list[asyncio.Task] = []
        self.counts = 0
        self.fetches = 0
        self.count_times: array = array("d")
        self.seen: list[tuple[float, float, float]] = []  # (noticed, sent_at, created_at)
        self.sqlite: list[sqlite3.Connection] = []
        self.pool = None
        self.topics: list[str] = []

    async def cmd_prepare(self, topics: list[str], pool_size: int) -> dict:
        """Open the database connections (before the clock starts)."""
        p = self.params
        self.topics = topics
        if p["backend"] == "postgres":
            import asyncpg

            async def keep(_connection) -> None:  # a persistent connection is not reset between queries
                return None

            self.pool = await asyncpg.create_pool(
                p["dsn"], min_size=pool_size, max_size=pool_size, reset=keep
            )
        else:
            self.sqlite = [
                sqlite3.connect(f"file:{p['path']}?mode=ro", uri=True, check_same_thread=False)
                for _ in topics
            ]
        return {"ready": len(topics)}

    async def cmd_poll(self, start_at: float, interval: float, seconds: float) -> dict:
        """From wall time ``start_at`` for ``seconds``, each client's first tick at a random phase within
        the first ``interval``; return the queries made and the events noticed."""
        topics = self.topics
        if self.pool is not None:
            pool = self.pool

            async def count(_: int, topic: str) -> int:
                return await pool.fetchval("SELECT COUNT(*) FROM events WHERE topic = $1", topic)

            async def fetch(_: int, topic: str, after: int) -> list:
                return await pool.fetch(
                    "SELECT id, data::text AS data, created_at FROM events WHERE topic = $1 AND id > $2 "
                    "ORDER BY id",
                    topic,
                    after,
                )
        else:

            async def count(slot: int, topic: str) -> int:
                return (
                    self.sqlite[slot]
                    .execute("SELECT COUNT(*) FROM events WHERE topic = ?", (topic,))
                    .fetchone()[0]
                )

            async def fetch(slot: int, topic: str, after: int) -> list:
                return (
                    self.sqlite[slot]
                    .execute(
                        "SELECT id, data, created_at FROM events WHERE topic = ? AND id > ? ORDER BY id",
                        (topic, after),
                    )
                    .fetchall()
                )

        await asyncio.sleep(max(0.0, start_at - time.time()))
        self.lags = array("d")
        started = time.perf_counter()
        cpu = time.process_time()
        until = started + seconds

        async def client(slot: int, topic: str) -> None:
            last_count, last_id, first = 0, 0, True
            tick = started + random.uniform(0, interval)
            while tick < until:  # every tick due within the window, each exactly once
                await asyncio.sleep(max(0.0, tick - time.perf_counter()))
                asked = time.perf_counter()
                value = await count(slot, topic)
                noticed = time.time()
                self.count_times.append(time.perf_counter() - asked)
                self.counts += 1
                if value != last_count:
                    rows = await fetch(slot, topic, last_id)
                    self.fetches += 1
                    for row in rows:
                        event_id, data, created = row[0], row[1], row[2]
                        body = json.loads(data) if isinstance(data, str) else data
                        created_ts = (
                            created.replace(tzinfo=created.tzinfo or UTC).timestamp()
                            if isinstance(created, datetime)
                            else _timestamp(created)
                        )
                        if not first:  # the first tick only learns where the topic stands
                            self.seen.append((noticed, float(body["sent_at"]), created_ts))
                        last_id = max(last_id, event_id)
                    last_count = value
                first = False
                tick += interval

        self.tasks = [asyncio.create_task(client(slot, topic)) for slot, topic in enumerate(topics)]
        await asyncio.gather(*self.tasks)
        wall = time.perf_counter() - started
        result = {
            "clients": len(topics),
            "counts": self.counts,
            "fetches": self.fetches,
            "wall_s": wall,
            "cpu_s": time.process_time() - cpu,
            "count_times": self.count_times,
            "seen": self.seen,
            "lag_max_s": max(self.lags) if self.lags else 0.0,
        }
        if self.pool is not None:
            await self.pool.close()
        for connection in self.sqlite:
            connection.close()
        return result


# ------------------------------------------------------------------------------------------ processes


def _process_main(kind: str, pipe, params: dict[str, Any]) -> None:
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    worker = (SSEWorker if kind == "sse" else PollWorker)(pipe, params)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(worker.main())


class Fleet:
    """Client processes (``python -m bench.realtime_load``, so they import nothing of the parent's) driven
    over a socket pair each: send one command to each, gather the answers."""

    def __init__(self, kind: str, count: int, params: dict[str, Any]) -> None:
        root = Path(__file__).resolve().parents[1]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        }
        self.pipes: list[Connection] = []
        self.processes: list[subprocess.Popen] = []
        try:
            for _ in range(count):
                mine, theirs = socket.socketpair()
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.realtime_load",
                        kind,
                        str(theirs.fileno()),
                        json.dumps(params),
                    ],
                    pass_fds=(theirs.fileno(),),
                    env=env,
                    cwd=root,
                )
                theirs.close()
                self.pipes.append(Connection(mine.detach()))
                self.processes.append(process)
        except BaseException:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    async def ask(self, name: str, *per_process_args: list | None, timeout_s: float = 600.0) -> list:
        """Send ``(name, *args_i)`` to process i (``per_process_args``: one list of args per process,
        or nothing); return the answers in order."""
        for i, pipe in enumerate(self.pipes):
            args = per_process_args[0][i] if per_process_args else ()
            pipe.send((name, *args))
        answers = []
        deadline = time.monotonic() + timeout_s
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            while not pipe.poll(0):
                if process.poll() is not None:
                    raise RuntimeError(f"client process {process.pid} died ({process.returncode})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client process {process.pid}: no answer to {name}")
                await asyncio.sleep(0.01)
            answer = pipe.recv()
            if isinstance(answer, dict) and "error" in answer:
                raise RuntimeError(f"client process {process.pid}, {name}: {answer['error']}")
            answers.append(answer)
        return answers

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.ask("stop", timeout_s=10)
        self.kill()

    def kill(self) -> None:
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for pipe in self.pipes:
            pipe.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (from /proc/<pid>/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


if __name__ == "__main__":
    _process_main(sys.argv[1], Connection(int(sys.argv[2])), json.loads(sys.argv[3]))
