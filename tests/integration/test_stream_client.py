"""The stream clients (:mod:`dispatchd.client`, ``static/dispatchd-stream.js``) against a real server
(uvicorn on loopback), on SQLite and PostgreSQL.

Connections are cut by a TCP proxy in front of the server (as a network would) or by stopping the
server and starting another on the same port; after either, every event arrives once, in id order,
resumed with ``Last-Event-ID`` (Python) or ``?after=`` (JavaScript). Backoff waits go through an
injected ``sleep`` that records them, so no test waits out a real backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from dispatchd.app import create_app
from dispatchd.client import StreamEvent, StreamLost, StreamRefused, stream, stream_token
from dispatchd.config import Settings
from dispatchd.core import events as event_log
from dispatchd.replay import SHIPPED_TRIPS, ReplayOptions
from dispatchd.replay.runner import _Replay
from tests.conftest import ADMIN_KEY, admin_headers, free_port, make_settings, serve_app

JS_CLIENT = Path(__file__).resolve().parents[2] / "src" / "dispatchd" / "static" / "dispatchd-stream.js"
WAIT_S = 15.0


@pytest.fixture
def settings(db_url: str) -> Settings:
    # Revoked keys' streams are looked for every auth_cache_s (at least 0.5 s) by the hub.
    return make_settings(db_url, auth_cache_s=0.5)


# ---------------------------------------------------------------------------------------------------------
# Helpers


async def publish(server: str, topic: str, count: int, type_: str = "Tick") -> list[int]:
    """Write ``count`` events to ``topic`` with ``POST /v1/events``; their ids."""
    body = {"events": [{"topic": topic, "type": type_, "data": {"n": n}} for n in range(count)]}
    async with httpx.AsyncClient(base_url=server, headers=admin_headers()) as http:
        answer = await http.post("/v1/events", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()["ids"]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (at most WAIT_S) for ``condition``, checking every 10 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"waited {WAIT_S:g} s for {what}")


class Collector:
    """Consumes a stream in a task; ``events`` grows as they arrive, ``error`` is what ended it."""

    def __init__(self, events: AsyncIterator[StreamEvent]) -> None:
        self.events: list[StreamEvent] = []
        self.error: BaseException | None = None
        self._source = events
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self._source:
                self.events.append(event)
        except Exception as exc:
            self.error = exc

    @property
    def ids(self) -> list[int]:
        return [event.id for event in self.events]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self._source.aclose()  # type: ignore[attr-defined]


class RecordingSleep:
    """An injected ``sleep``: records each backoff delay and waits only ``real_s``."""

    def __init__(self, real_s: float = 0.02) -> None:
        self.delays: list[float] = []
        self.real_s = real_s

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(self.real_s)


class Proxy:
    """A TCP proxy in front of ``upstream`` that can cut every connection at once (``drop``); ``heads``
    keeps the first bytes each client sent (its request line and headers)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = httpx.URL(upstream)
        self.heads: list[bytearray] = []
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.drop()
        await self._server.wait_closed()

    def request_heads(self) -> list[str]:
        return [bytes(head).decode("latin-1").lower() for head in self.heads]

    def drop(self) -> None:
        for client, upstream in self._pairs:
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.upstream.host, self.upstream.port)
        self._pairs.append((writer, up_writer))
        head = bytearray()
        self.heads.append(head)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await source.read(65536):
                    if record and len(head) < 8192:
                        head.extend(data)
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))


def uvicorn_server(settings: Settings, clock, port: int):
    """Like the ``live_server`` fixture, on a given port, stopped on exit (open streams cut after 2 s)."""
    return serve_app(create_app(settings, clock=clock, run_migrations=False, background=False), port)


# ---------------------------------------------------------------------------------------------------------
# Python client


async def test_receives_the_events_of_its_topics_written_after_it_connects(live_server):
    before = await publish(live_server, "test:1", 1)
    opened = asyncio.Event()
    collector = Collector(stream(live_server, ADMIN_KEY, ["test:1"], on_open=opened.set, max_retries=0))
    try:
        await asyncio.wait_for(opened.wait(), WAIT_S)
        others = await publish(live_server, "test:2", 2)
        ids = await publish(live_server, "test:1", 3)
        await until(lambda: len(collector.events) >= 3, "three events")
        await asyncio.sleep(0.2)  # room for an event that should not come
    finally:
        await collector.close()
    assert collector.error is None, collector.error
    assert collector.ids == ids  # not the one written before, not test:2's
    assert not set(before + others) & set(collector.ids)
    first = collector.events[0]
    assert (first.topic, first.type, first.data) == ("test:1", "Tick", {"n": 0})
    assert first.created_at.tzinfo is not None


async def test_resumes_after_cut_connections_with_every_event_once_in_order(live_server, settings):
    sleep = RecordingSleep()
    async with Proxy(live_server) as proxy:
        collector = Collector(
            stream(proxy.url, ADMIN_KEY, ["test:1"], after=0, backoff_s=(0.05, 0.2), sleep=sleep)
        )
        try:
            written = await publish(live_server, "test:1", 3)
            await until(lambda: len(collector.events) >= 3, "the first three events")
            proxy.drop()
            written += await publish(live_server, "test:1", 3)  # while cut, or just after
            await until(lambda: len(collector.events) >= 6, "the events written while cut")
            proxy.drop()
            written += await publish(live_server, "test:1", 2)
            await until(lambda: len(collector.events) >= 8, "the events after the second cut")
            await asyncio.sleep(0.2)  # room for a repeat that should not come
        finally:
            await collector.close()
        heads = proxy.request_heads()
    assert collector.error is None, collector.error
    assert collector.ids == written  # each once, in id order
    assert len(heads) >= 3
    assert "last-event-id: 0\r\n" in heads[0]
    # each reconnection resumed after the last event it had yielded
    assert f"last-event-id: {written[2]}\r\n" in heads[1]
    assert any(f"last-event-id: {written[5]}\r\n" in head for head in heads[2:])
    # the server's retry: hint (ms) replaced backoff_s's 0.05 s: delays drawn in [hint/2, hint]
    hint_s = settings.stream_retry_ms / 1000
    assert sleep.delays and all(hint_s / 2 <= delay <= hint_s for delay in sleep.delays), sleep.delays


async def test_resumes_across_a_server_restart(settings, clock, services):
    port = free_port()
    sleep = RecordingSleep(real_s=0.05)
    written: list[int] = []
    async with uvicorn_server(settings, clock, port) as server:
        collector = Collector(
            stream(server, ADMIN_KEY, ["test:1"], after=0, backoff_s=(0.05, 0.2), sleep=sleep)
        )
        written += await publish(server, "test:1", 2)
        await until(lambda: len(collector.events) >= 2, "the events before the restart")
    try:
        # the server is down: events written straight to the database are read from the log later
        async with services.db.transaction() as session:
            for n in range(2):
                event_log.append(session, "test:1", "Tick", {"n": 10 + n})
        async with services.db.read() as session:
            written += [event.id for event in await event_log.read(session, after_id=written[-1])]
        assert len(written) == 4
        async with uvicorn_server(settings, clock, port) as server:
            written += await publish(server, "test:1", 2)
            await until(lambda: len(collector.events) >= 6, "every event after the restart")
            await asyncio.sleep(0.2)
            await collector.close()
    finally:
        await collector.close()
    assert collector.error is None, collector.error
    assert collector.ids == written
    assert sleep.delays  # it did reconnect


async def test_a_bad_key_or_topic_is_refused_with_its_code_and_never_retried(live_server):
    sleep = RecordingSleep()
    with pytest.raises(StreamRefused) as refused:
        async for _ in stream(live_server, "dk_not_a_key_0123456789", sleep=sleep):
            pass
    assert (refused.value.status, refused.value.code) == (401, "UNAUTHORIZED")
    with pytest.raises(StreamRefused) as invalid:
        async for _ in stream(live_server, ADMIN_KEY, ["not a topic"], sleep=sleep):
            pass
    assert invalid.value.status == 422
    assert sleep.delays == []
    with pytest.raises(StreamRefused) as token_refused:
        await stream_token(live_server, "dk_not_a_key_0123456789", ["test:1"])
    assert (token_refused.value.status, token_refused.value.code) == (401, "UNAUTHORIZED")


async def test_a_stream_token_opens_the_stream_without_the_key(live_server):
    token = await stream_token(live_server, ADMIN_KEY, ["test:1"])
    opened = asyncio.Event()
    collector = Collector(stream(live_server, "", ["test:1"], token=token, on_open=opened.set, max_retries=0))
    try:
        await asyncio.wait_for(opened.wait(), WAIT_S)
        ids = await publish(live_server, "test:1", 1)
        await until(lambda: len(collector.events) >= 1, "the event")
    finally:
        await collector.close()
    assert collector.ids == ids


async def test_a_revoked_key_gets_a_close_frame_and_is_not_retried(live_server):
    async with httpx.AsyncClient(base_url=live_server, headers=admin_headers()) as http:
        created = (await http.post("/v1/api-keys", json={"role": "integration"})).json()
        opened = asyncio.Event()
        sleep = RecordingSleep()
        collector = Collector(stream(live_server, created["key"], on_open=opened.set, sleep=sleep))
        try:
            await asyncio.wait_for(opened.wait(), WAIT_S)
            assert (await http.delete(f"/v1/api-keys/{created['id']}")).status_code == 200
            await asyncio.wait_for(asyncio.shield(collector.task), WAIT_S)
        finally:
            await collector.close()
    assert isinstance(collector.error, StreamRefused), collector.error
    assert (collector.error.status, collector.error.code) == (None, "KEY_REVOKED")
    assert sleep.delays == []


async def test_backoff_doubles_up_to_its_cap_with_jitter_then_gives_up():
    # Nothing listens on this port: every connection fails at once (no database involved).
    url = f"http://127.0.0.1:{free_port()}"
    sleep = RecordingSleep(real_s=0)
    with pytest.raises(StreamLost) as lost:
        async for _ in stream(
            url, ADMIN_KEY, max_retries=4, backoff_s=(1.0, 3.0), sleep=sleep, rng=random.Random(7)
        ):
            pass
    assert isinstance(lost.value.__cause__, httpx.ConnectError)
    assert len(sleep.delays) == 4  # the first try and 4 retries: 4 waits between them
    for delay, ceiling in zip(sleep.delays, [1.0, 2.0, 3.0, 3.0], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(sleep.delays)) == 4  # jittered


async def test_the_replays_drivers_follow_the_stream_from_the_log_head(live_server):
    replay = _Replay(
        ReplayOptions(SHIPPED_TRIPS, live_server, ADMIN_KEY, start=None, end=None, speed=1.0, drivers=1),
        Console(file=io.StringIO()),
    )
    seen: list[dict] = []
    replay._on_event = seen.append  # type: ignore[method-assign]
    async with httpx.AsyncClient(base_url=live_server, headers=admin_headers()) as http:
        replay.events_client = http
        assert await replay._event_log_head() == 0
        history = await publish(live_server, "test:1", 37)  # another run's: never handed to the drivers
        assert await replay._event_log_head() == history[-1]
        replay._spawn(replay._poll_events())
        try:
            await asyncio.wait_for(replay.events_caught_up.wait(), WAIT_S)
            ids = await publish(live_server, "booking:bkg_1", 3, type_="BookingCreated")
            await until(lambda: len(seen) >= 3, "the replay's events")
            await asyncio.sleep(0.2)
        finally:
            await replay._stop_tasks()
    assert [event["id"] for event in seen] == ids
    assert seen[0]["topic"] == "booking:bkg_1" and seen[0]["type"] == "BookingCreated"
    assert not replay.errors


# ---------------------------------------------------------------------------------------------------------
# JavaScript client


async def test_the_js_client_is_served_as_javascript_under_6_kb(client):
    answer = await client.get("/static/dispatchd-stream.js")
    assert answer.status_code == 200
    assert "javascript" in answer.headers["content-type"]
    assert answer.content == JS_CLIENT.read_bytes()
    assert len(answer.content) < 6 * 1024


def _node_with_eventsource() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    probe = subprocess.run(
        [node, "--experimental-eventsource", "-e", "process.exit(typeof EventSource === 'function' ? 0 : 1)"],
        capture_output=True,
        timeout=30,
    )
    return node if probe.returncode == 0 else None


NODE_SCRIPT = r"""
const [file, server, proxy, key] = process.argv.slice(2);
const dispatchdStream = require(file);
let tokens = 0;
const out = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const s = dispatchdStream({
  url: proxy,
  topics: ["test:1"],
  initialMs: 50,
  maxMs: 200,
  getToken: async () => {
    tokens++;
    const r = await fetch(server + "/v1/stream-tokens", {
      method: "POST",
      headers: {Authorization: "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({topics: ["test:1"]}),
    });
    if (!r.ok) { const e = new Error("token " + r.status); e.status = r.status; throw e; }
    return (await r.json()).token;
  },
  onStatus: (status, attempt) => out({status, attempt, tokens}),
});
s.on("Tick", (e) => out({event: e.id, type: e.type, topic: e.topic, n: e.data.n}));
s.on("*", (e) => out({any: e.id}));
process.stdin.on("data", () => { s.close(); out({last: s.lastEventId}); process.exit(0); });
"""


async def test_the_js_client_resumes_after_a_cut_with_a_fresh_token(live_server, tmp_path):
    node = _node_with_eventsource()
    if node is None:
        pytest.skip("no node with EventSource (node --experimental-eventsource, Node 20+)")
    script = tmp_path / "stream.js"
    script.write_text(NODE_SCRIPT)
    lines: list[dict] = []
    async with Proxy(live_server) as proxy:
        process = await asyncio.create_subprocess_exec(
            node, "--experimental-eventsource", str(script),
            str(JS_CLIENT), live_server, proxy.url, ADMIN_KEY,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None and process.stdin is not None

        async def read() -> None:
            assert process.stdout is not None
            async for line in process.stdout:
                lines.append(json.loads(line))

        reader = asyncio.create_task(read())

        def has(entry: dict) -> bool:
            return any(all(line.get(k) == v for k, v in entry.items()) for line in lines)

        def events() -> list[int]:
            return [line["event"] for line in lines if "event" in line]

        try:
            await until(lambda: has({"status": "open", "attempt": 1}), "the first connection open")
            written = await publish(live_server, "test:1", 2)
            await publish(live_server, "test:2", 1)
            await until(lambda: len(events()) >= 2, "two events")
            proxy.drop()
            await until(lambda: has({"status": "error", "attempt": 1}), "the cut seen")
            written += await publish(live_server, "test:1", 2)
            await until(lambda: len(events()) >= 4, "the events written around the cut")
            await asyncio.sleep(0.2)
            process.stdin.write(b"close\n")
            await process.stdin.drain()
            async with asyncio.timeout(WAIT_S):
                await process.wait()
                await reader
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            reader.cancel()
        heads = proxy.request_heads()
    assert events() == written, lines
    assert [line["any"] for line in lines if "any" in line] == written
    statuses = [(line["status"], line["attempt"]) for line in lines if "status" in line]
    assert statuses[:3] == [("connecting", 1), ("open", 1), ("error", 1)], statuses
    assert ("connecting", 2) in statuses and ("open", 2) in statuses
    assert statuses[-1][0] == "closed"
    # a token fetched before each connection, and the reconnection resumed after the last event
    assert (
        next(line["tokens"] for line in lines if line.get("status") == "open" and line["attempt"] == 2) == 2
    )
    assert "token=" in heads[0] and "after=" not in heads[0].split("\r\n")[0]
    assert f"after={written[1]}" in heads[1].split("\r\n")[0]
    assert lines[-1] == {"last": written[-1]}
