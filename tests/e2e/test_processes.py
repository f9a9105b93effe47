"""Real processes: ``dispatchd serve`` as a newcomer starts it, and two servers sharing PostgreSQL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dispatchd.cli import app as cli
from tests.conftest import ADMIN_KEY, booking_data, driver_data, free_port, reset_postgres


@contextmanager
def serve(env: dict[str, str], port: int, output: Path) -> Iterator[subprocess.Popen]:
    """Run ``dispatchd serve`` until ready; its output goes to ``output`` (a pipe would fill and block it)."""
    log = output.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatchd", "serve", "--port", str(port)],
        env={**os.environ, **env, "DISPATCHD_LOG_JSON": "true"},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, output.read_text()
            time.sleep(0.1)
        else:
            raise AssertionError("server never became ready")
        yield process
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()
    # Reached only when the block succeeded. A clean stop: the lifespan ran to its end ("dispatchd
    # stopped"), then uvicorn re-raised the SIGTERM it had caught, so the status is "killed by SIGTERM"
    # (-15 here, 143 in a shell), what systemd and Docker expect of a graceful stop; a crash exits 1.
    assert process.returncode == -signal.SIGTERM, (
        f"status {process.returncode}:\n{output.read_text()[-3000:]}"
    )
    assert '"dispatchd stopped"' in output.read_text()


def test_first_serve_generates_an_admin_key_and_delivers_messages(tmp_path: Path):
    port = free_port()
    env = {"DISPATCHD_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/d.db", "DISPATCHD_ADMIN_API_KEY": ""}
    env.pop("DISPATCHD_ADMIN_API_KEY")
    with serve(env, port, tmp_path / "serve.log"):
        base = f"http://127.0.0.1:{port}"
        key = re.search(r"(dk_[A-Za-z0-9_\-]+)", (tmp_path / "serve.log").read_text()).group(1)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as http:
            driver = http.post("/v1/drivers", json=driver_data()).json()
            booking = http.post("/v1/bookings", json=booking_data()).json()
            result = http.post(f"/v1/bookings/{booking['id']}/matching", json={}).json()
            assert result["driver_ids"] == [driver["id"]]
            for _ in range(100):
                page = http.get("/v1/notifications", params={"status": "SENT"}).json()
                if page["total"] == 2:
                    break
                time.sleep(0.05)
            assert page["total"] == 2  # the offer and the customer's message, sent by the log channel
            assert http.get("/docs").status_code == 200
    assert (tmp_path / "d.db").exists()


def test_sigterm_lets_the_request_in_flight_finish_then_stops(tmp_path: Path):
    """SIGTERM arrives while a request's body is still being sent: the server stops accepting, waits for
    that request (up to 10 s), answers it, stops its loops, and ends by SIGTERM's status (see ``serve``);
    the work it did is committed."""
    port = free_port()
    database = tmp_path / "t.db"
    env = {"DISPATCHD_DATABASE_URL": f"sqlite+aiosqlite:///{database}", "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY}
    body = json.dumps(driver_data(name="In Flight")).encode()
    half_sent, signalled = threading.Event(), threading.Event()

    def chunks() -> Iterator[bytes]:
        yield body[:10]
        half_sent.set()
        assert signalled.wait(10)
        time.sleep(0.5)  # the signal handled by the server while the body is incomplete
        yield body[10:]

    def post() -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
        return httpx.post(
            f"http://127.0.0.1:{port}/v1/drivers", content=chunks(), headers=headers, timeout=20
        )

    with serve(env, port, tmp_path / "serve.log") as process:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post)
            assert half_sent.wait(10)
            time.sleep(0.3)  # the headers reached the server: the request is in flight
            process.send_signal(signal.SIGTERM)
            signalled.set()
            response = answer.result(timeout=20)
        assert process.wait(timeout=15) == -signal.SIGTERM
    assert response.status_code == 201, response.text
    assert response.headers["Connection"] == "close"  # no keep-alive past the shutdown
    with sqlite3.connect(database) as connection:
        stored = connection.execute("SELECT id, name FROM drivers").fetchall()
    assert stored == [(response.json()["id"], "In Flight")]
    log = (tmp_path / "serve.log").read_text()
    assert log.index("Shutting down") < log.index("dispatchd stopped")


def test_keys_create_prints_a_working_key(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path}/k.db"
    runner = CliRunner()
    migrated = runner.invoke(
        cli, ["migrate"], env={"DISPATCHD_DATABASE_URL": url, "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY}
    )
    assert migrated.exit_code == 0 and re.search(r"database at revision \d{4}", migrated.output)
    created = runner.invoke(
        cli, ["keys", "create", "--role", "integration"], env={"DISPATCHD_DATABASE_URL": url}
    )
    assert created.exit_code == 0, created.output
    assert re.search(r"dk_\S+", created.output)
    bad = runner.invoke(cli, ["keys", "create", "--role", "driver"], env={"DISPATCHD_DATABASE_URL": url})
    assert bad.exit_code == 1 and "driver_id" in bad.output
    listed = runner.invoke(cli, ["keys", "list"], env={"DISPATCHD_DATABASE_URL": url})
    assert "integration" in listed.output and "admin" in listed.output


def test_invalid_setting_stops_start_up_with_its_name():
    result = CliRunner().invoke(cli, ["serve"], env={"DISPATCHD_SEARCH_TIMEOUT_S": "soon"})
    assert result.exit_code == 2 and "DISPATCHD_SEARCH_TIMEOUT_S" in result.output


@pytest.mark.postgres
async def test_two_servers_on_one_postgres_assign_each_booking_once(postgres_url, tmp_path):
    await reset_postgres(postgres_url)
    ports = [free_port(), free_port()]
    env = {"DISPATCHD_DATABASE_URL": postgres_url, "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY}
    with serve(env, ports[0], tmp_path / "a.log"), serve(env, ports[1], tmp_path / "b.log"):
        clients = [
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                limits=httpx.Limits(max_connections=60),
                timeout=60,
            )
            for port in ports
        ]
        try:
            drivers = [
                (await clients[0].post("/v1/drivers", json=driver_data())).json()["id"] for _ in range(30)
            ]
            bookings = []
            for _ in range(5):
                booking = (await clients[1].post("/v1/bookings", json=booking_data())).json()
                await clients[1].post(f"/v1/bookings/{booking['id']}/matching", json={})
                bookings.append(booking["id"])

            async def accept(n: int, booking_id: str, driver_id: str) -> tuple[str, str, str]:
                answer = await clients[n % 2].post(
                    f"/v1/bookings/{booking_id}/responses", json={"driver_id": driver_id, "type": "ACCEPT"}
                )
                assert answer.status_code == 200, answer.text
                return booking_id, driver_id, answer.json()["action"]

            results = await asyncio.gather(
                *(accept(i, b, d) for i, (b, d) in enumerate((b, d) for b in bookings for d in drivers))
            )
            won = [(b, d) for b, d, action in results if action == "ASSIGNED"]
            assert sorted(b for b, _ in won) == sorted(bookings)  # each booking exactly once
            assert len({d for _, d in won}) == len(won)  # no driver twice
            for booking_id in bookings:
                seen_by = [(await c.get(f"/v1/bookings/{booking_id}")).json()["driver_id"] for c in clients]
                assert seen_by[0] == seen_by[1] == dict(won)[booking_id]
        finally:
            for http in clients:
                await http.aclose()


@pytest.mark.postgres
async def test_two_servers_on_one_postgres_sell_the_last_place_once(postgres_url, tmp_path):
    """Seed 003 "Scénario concurrence" across two `dispatchd serve` processes sharing PostgreSQL."""
    from tests.integration.test_reservations import _hundred_buyers_for_the_last_place

    await reset_postgres(postgres_url)
    ports = [free_port(), free_port()]
    env = {
        "DISPATCHD_DATABASE_URL": postgres_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_RATE_LIMIT": "",
    }
    with serve(env, ports[0], tmp_path / "a.log"), serve(env, ports[1], tmp_path / "b.log"):
        statuses = await _hundred_buyers_for_the_last_place([f"http://127.0.0.1:{p}" for p in ports])
    assert statuses.count(201) == 1 and statuses.count(409) == 99


def test_resources_import_is_all_or_nothing_with_line_numbers(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path}/i.db"
    env = {"DISPATCHD_DATABASE_URL": url, "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY}
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"], env=env).exit_code == 0
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "id,type,name,capacity,metadata\n"
        "bus-1,seat,Bus 1,45,\n"
        "bus-2,seat,Bus 2,-3,\n"
        "bus-3,seat,,10,\n"
        "bus-1,seat,Bus 1 again,5,\n"
        'tech-1,half_day,Awa,1,"{""zone"": ""Plateau""}"\n'
    )
    refused = runner.invoke(cli, ["resources", "import", str(bad)], env=env)
    assert refused.exit_code == 1
    for expected in (
        "line 3: capacity",
        "line 4: name",
        "line 5: id bus-1 already on line 2",
        "nothing imported",
    ):
        assert expected in " ".join(refused.output.split())  # Rich wraps long lines
    good = tmp_path / "good.csv"
    good.write_text(
        'id,type,name,capacity,metadata\nbus-1,seat,Bus 1,45,\ntech-1,half_day,Awa,1,"{""zone"": ""P""}"\n'
    )
    imported = runner.invoke(cli, ["resources", "import", str(good)], env=env)
    assert imported.exit_code == 0 and "imported 2 resources" in imported.output
    again = runner.invoke(cli, ["resources", "import", str(good)], env=env)
    assert again.exit_code == 1 and "nothing was imported" in " ".join(again.output.split())
    exported = runner.invoke(cli, ["reservations", "export", "--format", "csv"], env=env)
    assert exported.exit_code == 0
    assert (
        exported.output.splitlines()[0] == "id,resource_id,client_id,quantity,status,created_at,cancelled_at"
    )
