"""A real load balancer (issue 11, "Throughput"): nginx, configured by ``deploy/nginx/dispatchd.conf`` (the
file docs/operations.md documents, ports and paths substituted), in front of two ``dispatchd serve``
processes sharing one fresh PostgreSQL database, with a fake WhatsApp Cloud API as their channel.

Every request goes through nginx over TLS, with real concurrency (aiohttp, one socket per request in
flight). nginx's access log (the documented ``dispatchd`` format, with ``$upstream_addr``) shows which
instance answered each request: every scenario asserts that both did.

* the configuration and the systemd units shown in docs/operations.md are the files of ``deploy/``;
* the proxy itself: the request id, ``X-Forwarded-Proto`` trusted by dispatchd (console cookies are
  ``Secure`` through nginx, not on the instance's plain port), ``/metrics`` closed, http → https, SSE and
  the WebSocket upgrade;
* the accept race: one booking broadcast to 50 drivers, each with its own key, all accepting at once:
  one ASSIGNED, 49 ALREADY_TAKEN, one ``BookingAssigned`` in the log;
* the last-seat race: 100 concurrent reservations (a third for 2 places) of a resource of 10: never
  overbooked, refusals 409 ``RESOURCE_FULL``, no 5xx;
* the notification crash (last: it kills an instance): 200 outbox messages sent by both instances to the
  fake; one instance is killed with SIGKILL mid-delivery while clients keep reading and reserving through
  nginx. Every read succeeds (nginx retries an idempotent request on the other instance); a reservation
  is answered 201 or, if its instance died with it, 502 (nginx does not retry a POST), and sent again with
  its Idempotency-Key it is booked once. Every message ends SENT at the fake, none lost, duplicates
  bounded by the rows in flight at the kill.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import httpx
import pytest
import pytest_asyncio
import websockets
from sqlalchemy import func, select

from dispatchd.core.db import Database
from dispatchd.core.events import Event
from dispatchd.matching.models import Booking
from dispatchd.notifications import outbox
from dispatchd.notifications.models import OPEN_STATUSES, Notification, NotificationStatus
from dispatchd.notifications.outbox import Message
from dispatchd.reservations.models import Reservation, Resource
from tests.conftest import (
    ADMIN_KEY,
    POSTGRES_URL,
    _create_postgres_database,
    _drop_postgres_database,
    _unavailable,
    booking_data,
    driver_data,
    free_port,
)
from tests.e2e.nginx_helpers import DEPLOY_CONF, ROOT, Nginx, nginx_binary, start_nginx
from tests.e2e.test_delivery_crash import sigkill, start, stop, wait_until
from tests.e2e.test_inbound_crash import serve

pytestmark = [pytest.mark.postgres, pytest.mark.asyncio(loop_scope="module")]

DRIVERS = 50
CAPACITY = 10
BUYERS = 100
MESSAGES = 200
FAKE_LATENCY_MS = 100  # every send takes this long: a batch is in flight most of the time
DELIVERY_CONCURRENCY = 10
KILL_AFTER_SENT = 40
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SYSTEMD_UNITS = ("dispatchd-serve@.service", "dispatchd-worker.service")


@dataclass
class Stack:
    nginx: Nginx
    servers: dict[str, subprocess.Popen]  # "127.0.0.1:<port>" → its process
    database_url: str
    fake_url: str
    db: Database

    def session(self, **kwargs) -> aiohttp.ClientSession:
        """A client of nginx (TLS, trusting its test certificate) with the admin key; no pool limit beyond
        ``limit`` (default 200)."""
        limit = kwargs.pop("limit", 200)
        connector = aiohttp.TCPConnector(limit=limit, ssl=self.nginx.ssl_context)
        return aiohttp.ClientSession(self.nginx.url, connector=connector, headers=ADMIN, **kwargs)

    async def upstream_counts(self, uri: str, count: int) -> collections.Counter[str]:
        """How many of the (at least ``count``) requests for ``uri`` each instance answered (the last one
        tried, per access log line)."""
        lines = await self.nginx.lines_for(uri, count)
        return collections.Counter(line["upstreams"][-1] for line in lines if line["upstreams"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    nginx_binary()  # skip (or fail in CI) first, before starting anything
    began = time.monotonic()
    try:
        url = await asyncio.wait_for(_create_postgres_database("dispatchd_nginx"), 30)
    except Exception as exc:
        _unavailable(f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}: {exc}"[:300])
    tmp = tmp_path_factory.mktemp("nginx")
    fake_port = free_port()
    fake_url = f"http://127.0.0.1:{fake_port}"
    env = {
        "DISPATCHD_DATABASE_URL": url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_LOG_JSON": "true",
        "DISPATCHD_LOG_LEVEL": "WARNING",
        "DISPATCHD_DRIVER_STALE_AFTER_S": "0",
        "DISPATCHD_RATE_LIMIT": "",
        "DISPATCHD_NOTIFICATION_CHANNEL": "whatsapp_cloud",
        "DISPATCHD_WHATSAPP_API_BASE_URL": f"{fake_url}/v21.0",
        "DISPATCHD_WHATSAPP_ACCESS_TOKEN": "fake-token",
        "DISPATCHD_WHATSAPP_PHONE_NUMBER_ID": "1234567890",
        "DISPATCHD_RECIPIENT_INTERVAL_S": "0",
        "DISPATCHD_CHANNEL_RATE": "",  # no drain limit
        "DISPATCHD_DELIVERY_LEASE_S": "2",
        "DISPATCHD_DELIVERY_CONCURRENCY": str(DELIVERY_CONCURRENCY),
    }
    processes: list[subprocess.Popen] = []
    nginx: Nginx | None = None
    db = Database(url)
    try:
        fake = start(
            [sys.executable, "-m", "dispatchd.testing.fake_whatsapp", "--port", str(fake_port),
             "--fail-rate", "0.0", "--latency-ms", str(FAKE_LATENCY_MS)],
            tmp / "fake.log",
        )  # fmt: skip
        processes.append(fake)
        database_s = time.monotonic() - began
        started = await asyncio.gather(
            serve(tmp, "serve-a", env), serve(tmp, "serve-b", env), return_exceptions=True
        )
        processes += [found[0] for found in started if not isinstance(found, BaseException)]
        for found in started:
            if isinstance(found, BaseException):
                raise found
        servers = {found[1].removeprefix("http://"): found[0] for found in started}
        ports = tuple(int(address.rsplit(":", 1)[1]) for address in servers)
        nginx = start_nginx(tmp / "nginx", ports, free_port(), free_port())

        async def fake_up() -> bool:
            assert fake.poll() is None, (tmp / "fake.log").read_text()
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"{fake_url}/stats")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(fake_up, 15, "the fake WhatsApp server", interval_s=0.05)
        servers_s = time.monotonic() - began - database_s
        print(f"\nstack: database {database_s:.1f} s, then servers and nginx {servers_s:.1f} s")
        yield Stack(nginx, servers, url, fake_url, db)
    finally:
        if nginx is not None:
            nginx.stop()
        for process in reversed(processes):
            stop(process)
        await db.dispose()
        await _drop_postgres_database(url)


def _blocks(markdown: str, heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the section under ``heading`` (up to the next ``## ``)."""
    section = markdown.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n```", 1)[0] + "\n" for block in section.split(f"```{language}\n")[1:]]


async def test_the_documented_configuration_is_the_tested_one():
    """docs/operations.md shows deploy/nginx/dispatchd.conf (which the tests below run) and the systemd
    units as they are in deploy/systemd/, character for character."""
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert _blocks(operations, "## Behind nginx", "nginx") == [DEPLOY_CONF.read_text()]
    units = [(ROOT / "deploy" / "systemd" / name).read_text() for name in SYSTEMD_UNITS]
    assert _blocks(operations, "## systemd", "ini") == units


async def test_the_proxy_passes_request_ids_forwarded_proto_streams_and_websockets(stack: Stack):
    async with stack.session() as http:
        async with http.get("/ready") as ready:
            assert ready.status == 200, await ready.text()
            request_id = ready.headers["X-Request-ID"]
        # nginx's $request_id reached dispatchd, which echoed it: one id in both logs
        assert len(request_id) == 32 and int(request_id, 16) >= 0
        assert [line["request_id"] for line in await stack.nginx.lines_for("/ready", 1)] == [request_id]

        # X-Forwarded-Proto: https is trusted from 127.0.0.1, so console cookies are Secure through nginx…
        async with http.get("/console/sign-in") as page:
            assert page.status == 200
            proxied_cookie = page.headers.getall("Set-Cookie")
        backend = next(iter(stack.servers))
        async with httpx.AsyncClient() as direct:
            plain_cookie = (await direct.get(f"http://{backend}/console/sign-in")).headers.get_list(
                "set-cookie"
            )
            # …and Prometheus scrapes each instance directly: /metrics is not public
            assert (await direct.get(f"http://{backend}/metrics")).status_code == 200
            redirect = await direct.get(f"{stack.nginx.http_url}/v1/events?after=0")
        assert proxied_cookie and all("Secure" in cookie for cookie in proxied_cookie), proxied_cookie
        assert plain_cookie and not any("Secure" in cookie for cookie in plain_cookie), plain_cookie
        async with http.get("/metrics") as metrics:
            assert metrics.status == 403
        assert redirect.status_code == 301
        assert redirect.headers["location"].startswith("https://") and redirect.headers["location"].endswith(
            "/v1/events?after=0"
        )

        # SSE through nginx: a frame arrives as soon as it is written (buffering off)
        async with http.post("/v1/resources", json={"type": "seat", "name": "SSE", "capacity": 5}) as created:
            resource_id = (await created.json())["id"]
        async with http.get("/v1/stream", params={"topic": f"resource:{resource_id}"}) as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            assert (await asyncio.wait_for(stream.content.readline(), 5)).startswith(b"retry:")
            reservation = {"resource_id": resource_id, "client_id": "sse", "quantity": 1}
            async with http.post("/v1/reservations", json=reservation) as reserved:
                assert reserved.status == 201, await reserved.text()
            sent = time.monotonic()
            while (
                line := await asyncio.wait_for(stream.content.readline(), 5)
            ) != b"event: ReservationConfirmed\n":
                assert line, "the stream ended"
            assert time.monotonic() - sent < 3  # a buffering proxy holds it until a buffer fills

    # WebSocket through nginx: the upgrade is passed, then ping/pong
    ws_url = stack.nginx.url.replace("https://", "wss://") + "/v1/ws"
    async with websockets.connect(ws_url, ssl=stack.nginx.ssl_context, additional_headers=ADMIN) as socket:
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["op"] == "welcome"
        await socket.send('{"op": "ping"}')
        assert json.loads(await asyncio.wait_for(socket.recv(), 5))["op"] == "pong"
    assert [line["status"] for line in await stack.nginx.lines_for("/v1/ws", 1)] == ["101"]


async def test_fifty_drivers_accept_at_once_through_nginx_one_wins(stack: Stack):
    async with stack.session() as http:
        semaphore = asyncio.Semaphore(10)

        async def driver_with_key() -> tuple[str, str]:
            async with semaphore:
                async with http.post("/v1/drivers", json=driver_data()) as created:
                    assert created.status == 201, await created.text()
                    driver_id = (await created.json())["id"]
                async with http.post("/v1/api-keys", json={"role": "driver", "driver_id": driver_id}) as key:
                    assert key.status == 201, await key.text()
                    return driver_id, (await key.json())["key"]

        drivers = await asyncio.gather(*(driver_with_key() for _ in range(DRIVERS)))
        async with http.post("/v1/bookings", json=booking_data()) as created:
            booking_id = (await created.json())["id"]
        async with http.post(f"/v1/bookings/{booking_id}/matching", json={}) as started:
            assert started.status == 200, await started.text()
            assert sorted((await started.json())["driver_ids"]) == sorted(d for d, _ in drivers)

        barrier = asyncio.Barrier(DRIVERS)

        async def accept(driver_id: str, key: str) -> tuple[int, str, str]:
            await barrier.wait()
            async with http.post(
                f"/v1/bookings/{booking_id}/responses",
                json={"driver_id": driver_id, "type": "ACCEPT"},
                headers={"Authorization": f"Bearer {key}"},
            ) as answer:
                return answer.status, (await answer.json())["action"], driver_id

        results = await asyncio.gather(*(accept(d, k) for d, k in drivers))
        async with http.get(f"/v1/bookings/{booking_id}") as read:
            booking = await read.json()

    actions = collections.Counter(action for _, action, _ in results)
    assert {status for status, _, _ in results} == {200}
    assert actions == {"ASSIGNED": 1, "ALREADY_TAKEN": DRIVERS - 1}, actions
    winner = next(driver_id for _, action, driver_id in results if action == "ASSIGNED")
    assert (booking["status"], booking["driver_id"]) == ("ASSIGNED", winner)
    async with stack.db.read() as session:
        row = await session.get(Booking, booking_id)
        assigned = (
            await session.scalars(
                select(Event).where(Event.topic == f"booking:{booking_id}", Event.type == "BookingAssigned")
            )
        ).all()
    assert (row.status, row.driver_id) == ("ASSIGNED", winner)
    assert [event.data["driver_id"] for event in assigned] == [winner]
    served = await stack.upstream_counts(f"/v1/bookings/{booking_id}/responses", DRIVERS)
    print(f"\naccept race: {dict(actions)}; answered per instance: {dict(served)}")
    assert sum(served.values()) == DRIVERS and set(served) == set(stack.servers), served


async def test_a_hundred_buyers_for_ten_places_through_nginx_never_overbook(stack: Stack):
    async with stack.session() as http:
        async with http.post(
            "/v1/resources", json={"type": "seat", "name": "Bus 7", "capacity": CAPACITY}
        ) as made:
            assert made.status == 201, await made.text()
            resource_id = (await made.json())["id"]
        barrier = asyncio.Barrier(BUYERS)

        async def buy(n: int) -> tuple[int, int, str]:
            quantity = 2 if n % 3 == 0 else 1
            await barrier.wait()
            async with http.post(
                "/v1/reservations",
                json={"resource_id": resource_id, "client_id": f"buyer-{n}", "quantity": quantity},
            ) as answer:
                body = await answer.json()
                return answer.status, quantity, body.get("code", body.get("status", ""))

        results = await asyncio.gather(*(buy(n) for n in range(BUYERS)))
        async with http.get(f"/v1/resources/{resource_id}") as read:
            resource = await read.json()

    outcomes = collections.Counter((status, code) for status, _, code in results)
    print(f"\nlast-seat race: {dict(outcomes)}; resource: {resource['reserved']}/{resource['capacity']}")
    assert set(outcomes) <= {(201, "CONFIRMED"), (409, "RESOURCE_FULL")}, outcomes
    confirmed = sum(quantity for status, quantity, _ in results if status == 201)
    assert confirmed == resource["reserved"] <= CAPACITY
    if any(status == 409 and quantity == 1 for status, quantity, _ in results):
        assert resource["reserved"] == CAPACITY  # one place was refused: none was left
    async with stack.db.read() as session:
        row = await session.get(Resource, resource_id)
        stored = await session.scalar(
            select(func.coalesce(func.sum(Reservation.quantity), 0)).where(
                Reservation.resource_id == resource_id, Reservation.status == "CONFIRMED"
            )
        )
    assert row.reserved == stored == confirmed
    served = await stack.upstream_counts("/v1/reservations", BUYERS)
    assert sum(served.values()) >= BUYERS and set(served) == set(stack.servers), served


async def _statuses(db: Database, ids: list[str]) -> dict[str, int]:
    async with db.read() as session:
        rows = await session.execute(
            select(Notification.status, func.count())
            .where(Notification.id.in_(ids))
            .group_by(Notification.status)
        )
        return {status: count for status, count in rows.all()}


async def test_an_instance_killed_mid_delivery_loses_no_message_and_nginx_keeps_answering(stack: Stack):
    """Last in the module: it kills one instance."""
    async with stack.session() as http:
        async with http.post("/v1/resources", json={"type": "seat", "name": "Read", "capacity": 1}) as made:
            resource_id = (await made.json())["id"]
        async with http.post("/v1/resources", json={"type": "seat", "name": "W", "capacity": 10**6}) as made:
            written_id = (await made.json())["id"]
        enqueued_at = time.monotonic()
        async with stack.db.transaction() as session:
            ids = await outbox.enqueue(
                session,
                [
                    Message(recipient=f"+22178{i:07d}", category="information", body=f"nginx {i}")
                    for i in range(MESSAGES)
                ],
            )

        # Clients keep reading through nginx, before, during and after the kill.
        reads: list[tuple[float, int]] = []
        stop_reading = asyncio.Event()

        async def reader() -> None:
            while not stop_reading.is_set():
                async with http.get(f"/v1/resources/{resource_id}") as answer:
                    await answer.read()
                    reads.append((time.monotonic(), answer.status))

        # …and keep reserving, each reservation with its Idempotency-Key. nginx does not retry a POST
        # that reached the killed instance (it may have been applied): the client gets 502 and sends it
        # again with the same key, which books it once.
        writes: list[tuple[str, list[int]]] = []  # (key, the status of each attempt)

        async def writer(number: int) -> None:
            for n in itertools.count():
                if stop_reading.is_set():
                    return
                key = f"kill-{number}-{n}"
                attempts: list[int] = []
                writes.append((key, attempts))
                while not attempts or attempts[-1] != 201:
                    assert len(attempts) < 5, (key, attempts)
                    async with http.post(
                        "/v1/reservations",
                        json={"resource_id": written_id, "client_id": key, "quantity": 1},
                        headers={"Idempotency-Key": key},
                    ) as answer:
                        await answer.read()
                        attempts.append(answer.status)

        readers = [asyncio.create_task(reader()) for _ in range(6)]
        readers += [asyncio.create_task(writer(number)) for number in range(2)]
        try:

            async def mid_delivery() -> dict[str, int] | None:
                counts = await _statuses(stack.db, ids)
                sent = counts.get(NotificationStatus.SENT, 0)
                return counts if KILL_AFTER_SENT <= sent < MESSAGES and counts.get("SENDING", 0) else None

            before = await wait_until(
                mid_delivery, 30, f"{KILL_AFTER_SENT} messages SENT and a batch in flight"
            )
            victim, survivor = list(stack.servers)
            assert sigkill(stack.servers[victim]) == -9
            killed_at = time.monotonic()
            at_kill = await _statuses(stack.db, ids)
            in_flight = at_kill.get(NotificationStatus.SENDING, 0)

            async def reads_after_kill() -> bool:
                return sum(1 for at, _ in reads if at > killed_at) >= 100

            await wait_until(reads_after_kill, 15, "100 reads after the kill")
        finally:
            stop_reading.set()
            await asyncio.gather(*readers, return_exceptions=True)
        for task in readers:
            assert task.exception() is None, repr(task.exception())

        async def all_final() -> dict[str, int] | None:
            counts = await _statuses(stack.db, ids)
            return counts if not any(counts.get(s, 0) for s in OPEN_STATUSES) else None

        final = await wait_until(all_final, 30, "every message in a final state", interval_s=0.1)
        final_at = time.monotonic()

    first_tries = collections.Counter(attempts[0] for _, attempts in writes)
    assert set(first_tries) <= {201, 502}, first_tries  # a POST is answered, or lost with its instance
    async with stack.db.read() as session:
        booked = collections.Counter(
            (
                await session.scalars(
                    select(Reservation.client_id).where(Reservation.resource_id == written_id)
                )
            ).all()
        )
        written = await session.get(Resource, written_id)
    assert booked == {key: 1 for key, _ in writes}  # each reservation once, retried or not
    assert written.reserved == len(writes)

    async with httpx.AsyncClient(timeout=10) as fake:
        stats = (await fake.get(f"{stack.fake_url}/stats", params={"ids": 1})).json()
    counts = {nid: n for nid, n in stats["counts"].items() if nid in set(ids)}
    duplicated = {nid: n for nid, n in counts.items() if n > 1}
    statuses = collections.Counter(status for _, status in reads)
    lines = await stack.nginx.lines_for(f"/v1/resources/{resource_id}", len(reads))
    retried = [line for line in lines if len(line["upstreams"]) > 1]
    print(
        f"\nbefore kill: {before}; at kill: {at_kill}; final: {final}; duplicates: {len(duplicated)} "
        f"(≤ {in_flight} in flight); reads: {dict(statuses)}, "
        f"{sum(1 for at, _ in reads if at > killed_at)} after the kill, {len(retried)} retried by nginx; "
        f"killed {killed_at - enqueued_at:.1f} s after the messages were written, all SENT "
        f"{final_at - killed_at:.1f} s after the kill; reservations: {len(writes)}, first answers "
        f"{dict(first_tries)}"
    )

    # nginx kept answering: every read succeeded, some by retrying on the survivor
    assert statuses == {200: len(reads)}, statuses
    assert len(lines) == len(reads) and {line["status"] for line in lines} == {"200"}
    assert {line["upstreams"][-1] for line in lines} == set(stack.servers)  # both answered before the kill
    assert retried and all(line["upstreams"] == [victim, survivor] for line in retried), retried[:3]
    # every message SENT, none lost, duplicates only among the rows in flight at the kill
    assert final == {NotificationStatus.SENT: MESSAGES}, final
    assert [nid for nid in ids if counts.get(nid, 0) == 0] == []
    assert len(duplicated) <= in_flight
    assert all(n == 2 for n in duplicated.values()), duplicated
    async with stack.db.read() as session:
        reclaimed = set(
            (
                await session.scalars(
                    select(Notification.id).where(Notification.id.in_(ids), Notification.attempts > 1)
                )
            ).all()
        )
    assert set(duplicated) <= reclaimed  # a duplicate is always a row claimed again after the kill
