"""Realtime across real processes (issue 9, "Proof"):

* an event committed on ``dispatchd serve`` #1 reaches a WebSocket subscriber on #2 in < 1 s
  (PostgreSQL ``LISTEN/NOTIFY`` wakes #2's hub; the fallback read alone would take up to 1 s);
* an agent whose WebSocket client is killed (SIGKILL: no close frame) is OFFLINE after the grace period
  and its conversation goes to the other agent, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
import websockets
from sqlalchemy import select

from dispatchd.assembly import build_services
from dispatchd.dispatcher.models import Agent, Conversation, Presence
from tests.conftest import ADMIN_KEY, admin_headers, make_settings, new_phone, reset_postgres
from tests.e2e.test_delivery_crash import stop, wait_until
from tests.e2e.test_inbound_crash import serve

SECRET = "realtime-e2e-secret"


@pytest.mark.postgres
async def test_an_event_committed_on_one_server_reaches_a_websocket_on_the_other_within_1_s(
    postgres_url, tmp_path
):
    await reset_postgres(postgres_url)
    env = {
        "DISPATCHD_DATABASE_URL": postgres_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_STREAM_FALLBACK_READ_S": "5",  # so that only NOTIFY can explain < 1 s
        "DISPATCHD_LOG_JSON": "true",
    }
    processes = []
    try:
        first, url_1 = await serve(tmp_path, "server-1", env)
        processes.append(first)
        second, url_2 = await serve(tmp_path, "server-2", env)
        processes.append(second)
        async with httpx.AsyncClient(base_url=url_1, headers=admin_headers(), timeout=10) as http:
            socket = await websockets.connect(
                url_2.replace("http://", "ws://") + "/v1/ws",
                additional_headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            async with socket:
                assert json.loads(await socket.recv())["op"] == "welcome"
                await socket.send(json.dumps({"op": "subscribe", "topics": ["test:x"]}))
                assert json.loads(await socket.recv())["op"] == "subscribed"
                delays = []
                for number in range(20):
                    sent = time.monotonic()
                    answer = await http.post(
                        "/v1/events",
                        json={"events": [{"topic": "test:x", "type": "Tick", "data": {"n": number}}]},
                    )
                    assert answer.status_code == 201
                    event = json.loads(await asyncio.wait_for(socket.recv(), 5))
                    delays.append(time.monotonic() - sent)
                    assert (event["id"], event["data"]) == (answer.json()["ids"][0], {"n": number})
        assert max(delays) < 1.0, delays
    finally:
        for process in processes:
            stop(process)


CLIENT = """
import asyncio, json, sys, websockets
async def main():
    socket = await websockets.connect(sys.argv[1])
    await socket.send(json.dumps({"op": "auth", "token": sys.argv[2]}))
    print(await socket.recv(), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_a_killed_agent_client_goes_offline_after_the_grace_and_its_conversation_moves_on(
    db_url, tmp_path
):
    if db_url.startswith("postgresql"):
        await reset_postgres(db_url)
    services = build_services(make_settings(db_url))
    env = {
        "DISPATCHD_DATABASE_URL": db_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_WHATSAPP_APP_SECRET": SECRET,
        "DISPATCHD_AGENT_PRESENCE_TIMEOUT_S": "3600",
        "DISPATCHD_AGENT_DISCONNECT_GRACE_S": "1",
        "DISPATCHD_SWEEP_INTERVAL_S": "0.2",
        "DISPATCHD_LOG_JSON": "true",
    }
    processes: list[subprocess.Popen] = []
    client = None
    try:
        server, url = await serve(tmp_path, "server", env)
        processes.append(server)
        async with httpx.AsyncClient(base_url=url, headers=admin_headers(), timeout=10) as http:
            agents = []
            for name in ("Awa", "Bintou"):
                created = await http.post("/v1/agents", json={"name": name, "phone": new_phone()})
                agents.append(created.json()["id"])
            key = (
                await http.post("/v1/api-keys", json={"role": "agent", "subject": f"agent:{agents[0]}"})
            ).json()
            token = (
                await http.post(
                    "/v1/stream-tokens", json={}, headers={"Authorization": f"Bearer {key['key']}"}
                )
            ).json()["token"]
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENT,
                url.replace("http://", "ws://") + "/v1/ws",
                token,
                stdout=asyncio.subprocess.PIPE,
            )
            assert json.loads(await client.stdout.readline())["op"] == "welcome"
            assert await _presence(services, agents[0]) == Presence.ONLINE.value
            phone = new_phone()
            answer = await http.post(
                "/v1/conversations/inbound", json={"customer_phone": phone, "body": "Allô"}
            )
            assert answer.status_code in (200, 201), answer.text
            assert (await _conversation(services, phone)).agent_id == agents[0]
            answer = await http.post(f"/v1/agents/{agents[1]}/presence", json={"status": "ONLINE"})
            assert answer.status_code == 200

            client.send_signal(signal.SIGKILL)  # no close frame: the server sees the socket drop
            await asyncio.wait_for(client.wait(), 10)
            killed_at = time.monotonic()

            async def moved() -> bool:
                return (await _conversation(services, phone)).agent_id == agents[1]

            await wait_until(moved, 15, "the conversation handed to the other agent")
            assert await _presence(services, agents[0]) == Presence.OFFLINE.value
            assert time.monotonic() - killed_at >= 0.8  # not before the grace period
    finally:
        if client is not None and client.returncode is None:
            client.kill()
            await client.wait()
        for process in processes:
            stop(process)
        await services.aclose()


async def _presence(services, agent_id: str) -> str:
    async with services.db.read() as session:
        return (await session.get(Agent, agent_id)).presence


async def _conversation(services, phone: str) -> Conversation:
    async with services.db.read() as session:
        return await session.scalar(select(Conversation).where(Conversation.customer_phone == phone))
