"""Crash test with real processes (issue 13): a driver's ACCEPTER tap is stored, then the server dies
before routing it. After a restart the tap is routed exactly once and the driver has the booking.

The first ``dispatchd serve`` answers the webhook with routing left to the sweeper
(``DISPATCHD_INBOUND_ROUTE_INLINE=false``) and a sweeper that ticks once at start, then every 60 s: the
tap is committed PENDING and nothing routes it, which is the state a crash between the two steps
leaves. It is killed with SIGKILL. Meta re-delivers the same message to the second server (a
duplicate: acknowledged, not stored again); the second server's sweeper routes the stored tap.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys

import httpx
from sqlalchemy import func, select

from dispatchd.assembly import build_services
from dispatchd.core.events import Event
from dispatchd.matching.models import Booking, BookingOffer
from dispatchd.notifications.models import InboundMessage, RoutingStatus
from tests.conftest import ADMIN_KEY, booking_data, driver_data, free_port, make_settings
from tests.e2e.test_delivery_crash import sigkill, start, stop, wait_until

SECRET = "crash-test-secret"


def delivery(wamid: str, phone: str, button_id: str) -> bytes:
    """One inbound button reply, shaped as Meta sends it (Cloud API webhook, ``interactive``)."""
    envelope = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "1"},
                            "contacts": [{"profile": {"name": "Driver"}, "wa_id": phone.lstrip("+")}],
                            "messages": [
                                {
                                    "from": phone.lstrip("+"),
                                    "id": wamid,
                                    "timestamp": "1767600000",
                                    "type": "interactive",
                                    "interactive": {
                                        "type": "button_reply",
                                        "button_reply": {"id": button_id, "title": "ACCEPTER"},
                                    },
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }
    return json.dumps(envelope).encode()


async def post(url: str, body: bytes) -> httpx.Response:
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(
            f"{url}/v1/webhooks/whatsapp",
            content=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature},
        )


async def serve(tmp_path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = start(
        [sys.executable, "-m", "dispatchd", "serve", "--port", str(port)], tmp_path / f"{name}.log", env
    )
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(f"{url}/ready")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_until(up, 30, f"{name} ready", interval_s=0.1)
    return process, url


async def test_a_tap_stored_before_a_crash_is_routed_once_after_restart(db_url, tmp_path):
    settings = make_settings(db_url)
    services = build_services(settings)  # the system clock, as the servers use
    env = {
        "DISPATCHD_DATABASE_URL": db_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_WHATSAPP_APP_SECRET": SECRET,
        "DISPATCHD_DRIVER_STALE_AFTER_S": "0",
        "DISPATCHD_LOG_JSON": "true",
    }
    processes: list[subprocess.Popen] = []
    try:
        driver = await services.matching.create_driver(driver_data())
        booking = await services.matching.create_booking(booking_data())
        started = await services.matching.start_matching(booking.id)
        assert started.driver_ids == [driver.id]
        wamid = "wamid.crash-test-0001"
        body = delivery(wamid, driver.phone, f"ACCEPT:{booking.id}")

        first, url = await serve(
            tmp_path,
            "server-1",
            {**env, "DISPATCHD_INBOUND_ROUTE_INLINE": "false", "DISPATCHD_SWEEP_INTERVAL_S": "60"},
        )
        processes.append(first)
        answer = await post(url, body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["messages"] == 1 and answer.json()["duplicates"] == 0

        async with services.db.read() as session:
            stored = (
                await session.scalars(
                    select(InboundMessage).where(InboundMessage.provider_message_id == wamid)
                )
            ).one()
            assert (stored.routing_status, stored.outcome) == (RoutingStatus.PENDING, None)
            assert (await session.get(Booking, booking.id)).status == "SEARCHING"
        assert sigkill(first) == -9

        second, url = await serve(tmp_path, "server-2", {**env, "DISPATCHD_SWEEP_INTERVAL_S": "0.2"})
        processes.append(second)
        again = await post(url, body)  # Meta re-delivers: a duplicate, acknowledged
        assert again.status_code == 200 and again.json()["duplicates"] == 1

        async def routed() -> InboundMessage | None:
            async with services.db.read() as session:
                row = await session.scalar(
                    select(InboundMessage).where(InboundMessage.provider_message_id == wamid)
                )
                return row if row.routing_status != RoutingStatus.PENDING else None

        row = await wait_until(routed, 20, "the stored tap routed after the restart", interval_s=0.1)
        assert (row.routing_status, row.handler, row.outcome) == (
            RoutingStatus.ROUTED,
            "matching.offer_button",
            "ASSIGNED",
        )
        assert row.attempts == 1
        async with services.db.read() as session:
            assigned = await session.get(Booking, booking.id)
            assert (assigned.status, assigned.driver_id) == ("ASSIGNED", driver.id)
            offer = (
                await session.scalars(select(BookingOffer).where(BookingOffer.booking_id == booking.id))
            ).one()
            assert offer.response == "ACCEPTED"
            inbound_rows = await session.scalar(
                select(func.count())
                .select_from(InboundMessage)
                .where(InboundMessage.provider_message_id == wamid)
            )
            assignments = await session.scalar(
                select(func.count())
                .select_from(Event)
                .where(Event.topic == f"booking:{booking.id}", Event.type == "BookingAssigned")
            )
        assert inbound_rows == 1 and assignments == 1
    finally:
        for process in reversed(processes):
            stop(process)
        await services.db.dispose()
