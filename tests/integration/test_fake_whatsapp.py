"""The fake WhatsApp Cloud API (``dispatchd.testing.fake_whatsapp``), through real HTTP.

Each test serves a fresh fake with uvicorn on a free loopback port; pair-limit intervals are measured on
an injected clock, moved by the test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dispatchd.notifications.channels.base import ChannelError, ErrorKind, OutboundMessage
from dispatchd.notifications.channels.whatsapp_cloud import WhatsAppCloudChannel
from dispatchd.testing.fake_whatsapp import PAIR_LIMIT_CODE, FakeWhatsApp, serving
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def text_message(to: str, body: str, notification_id: str) -> dict:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "biz_opaque_callback_data": notification_id,
        "type": "text",
        "text": {"preview_url": False, "body": body},
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def fake_url(clock: Clock) -> AsyncIterator[str]:
    async with serving(FakeWhatsApp(pair_interval_s=6.0, monotonic=clock)) as url:
        yield url


async def test_accepts_records_and_pages_messages(fake_url: str) -> None:
    async with httpx.AsyncClient(base_url=fake_url) as http:
        before = time.time()
        answers = [
            await http.post(
                "/v21.0/1234567890/messages", json=text_message(f"22177000000{n}", f"m{n}", f"ntf_{n}")
            )
            for n in range(5)
        ]
        assert [a.status_code for a in answers] == [200] * 5
        wamids = [a.json()["messages"][0]["id"] for a in answers]
        assert len(set(wamids)) == 5 and all(w.startswith("wamid.") for w in wamids)
        assert answers[0].json()["contacts"] == [{"input": "221770000000", "wa_id": "221770000000"}]

        first = (await http.get("/messages", params={"limit": 2})).json()
        assert [m["seq"] for m in first["messages"]] == [1, 2] and first["next_after"] == 2
        message = first["messages"][0]
        assert message["to"] == "221770000000" and message["type"] == "text"
        assert message["text"] == {"preview_url": False, "body": "m0"}
        assert message["biz_opaque_callback_data"] == "ntf_0"
        assert message["wamid"] == wamids[0] and message["phone_number_id"] == "1234567890"
        assert before <= message["at"] <= time.time()
        rest = (await http.get("/messages", params={"after": first["next_after"], "limit": 100})).json()
        assert [m["seq"] for m in rest["messages"]] == [3, 4, 5] and rest["next_after"] == 5
        empty = (await http.get("/messages", params={"after": 5})).json()
        assert empty == {"messages": [], "next_after": 5}

        stats = (await http.get("/stats", params={"ids": 1})).json()
        assert (stats["delivered"], stats["unique"], stats["calls"], stats["recorded"]) == (5, 5, 5, 5)
        assert stats["pair_limit_hits"] == 0 and stats["counts"]["ntf_3"] == 1

        assert (await http.post("/reset")).json() == {"reset": True}
        assert (await http.get("/messages")).json() == {"messages": [], "next_after": 0}
        assert (await http.get("/stats")).json()["recorded"] == 0


async def test_bad_paging_parameters_are_refused(fake_url: str) -> None:
    async with httpx.AsyncClient(base_url=fake_url) as http:
        for params in ({"after": "x"}, {"after": -1}, {"limit": 0}, {"limit": 1001}):
            answer = await http.get("/messages", params=params)
            assert answer.status_code == 400, params
            assert "error" in answer.json()


async def test_pair_rate_limit_refuses_like_meta_until_the_interval_has_passed(
    fake_url: str, clock: Clock
) -> None:
    async with httpx.AsyncClient(base_url=fake_url) as http:
        send = "/v21.0/1234567890/messages"
        assert (await http.post(send, json=text_message("221770000001", "a", "ntf_a"))).status_code == 200
        clock.now += 5.9
        refused = await http.post(send, json=text_message("+221770000001", "b", "ntf_b"))
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == PAIR_LIMIT_CODE
        assert error["message"] == "(#131056) (Business Account, Consumer Account) pair rate limit hit"
        # another user is not held; the refused call did not restart the interval
        assert (await http.post(send, json=text_message("221770000002", "c", "ntf_c"))).status_code == 200
        clock.now += 0.1
        assert (await http.post(send, json=text_message("221770000001", "b", "ntf_b"))).status_code == 200

        stats = (await http.get("/stats", params={"ids": 1})).json()
        assert stats["pair_limit_hits"] == 1
        assert (stats["calls"], stats["delivered"], stats["failed"]) == (4, 3, 0)
        assert stats["attempts"]["ntf_b"] == 2 and stats["counts"]["ntf_b"] == 1
        recorded = (await http.get("/messages")).json()["messages"]
        assert [m["biz_opaque_callback_data"] for m in recorded] == ["ntf_a", "ntf_c", "ntf_b"]


async def test_the_whatsapp_channel_reads_the_pair_limit_as_temporary(clock: Clock) -> None:
    async with serving(FakeWhatsApp(pair_interval_s=6.0, monotonic=clock)) as url:
        channel = WhatsAppCloudChannel(f"{url}/v21.0", "1234567890", "fake-token")
        try:
            offer = OutboundMessage(
                "ntf_1",
                "+221770000009",
                "driver_offer",
                "Nouvelle course",
                {"buttons": [{"id": "ACCEPT:bkg_ab12", "title": "ACCEPTER"}]},
            )
            sent = await channel.send(offer)
            with pytest.raises(ChannelError) as refused:
                await channel.send(OutboundMessage("ntf_2", "+221770000009", "info", "encore"))
            assert refused.value.classification.kind is ErrorKind.TEMPORARY
            assert refused.value.classification.code == f"META_{PAIR_LIMIT_CODE}"
        finally:
            await channel.aclose()
        async with httpx.AsyncClient(base_url=url) as http:
            [recorded] = (await http.get("/messages")).json()["messages"]
    assert recorded["wamid"] == sent.provider_message_id
    assert recorded["type"] == "interactive"
    assert recorded["interactive"]["action"]["buttons"][0]["reply"]["id"] == "ACCEPT:bkg_ab12"


async def test_failures_are_answered_503_and_not_recorded() -> None:
    async with (
        serving(FakeWhatsApp(fail_rate=1.0, seed=1)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        answer = await http.post("/v21.0/1/messages", json=text_message("221770000003", "x", "ntf_x"))
        assert answer.status_code == 503 and answer.json()["error"]["code"] == 131000
        stats = (await http.get("/stats", params={"ids": 1})).json()
        assert (stats["calls"], stats["failed"], stats["delivered"], stats["recorded"]) == (1, 1, 0, 0)
        assert stats["attempts"] == {"ntf_x": 1}


async def test_a_message_counts_before_a_slow_answer() -> None:
    async with (
        serving(FakeWhatsApp(latency_s=0.5)) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v21.0/1/messages", json=text_message("221770000004", "x", "ntf_y"), timeout=0.1)
        stats = (await http.get("/stats")).json()
        assert (stats["delivered"], stats["recorded"]) == (1, 1)


def _wait_up(url: str, process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(f"{url}/stats", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the fake did not start")


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "dispatchd", "fake-whatsapp"],
        ["-m", "dispatchd.testing.fake_whatsapp"],
        ["-m", "bench.fake_whatsapp"],
    ],
    ids=["cli", "module", "bench-shim"],
)
def test_command_line_entries_serve_the_fake(command: list[str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, *command, "--port", str(port), "--pair-interval-s", "60", "--latency-ms", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_up(url, process)
        first = httpx.post(f"{url}/v21.0/1/messages", json=text_message("221770000005", "a", "ntf_1"))
        second = httpx.post(f"{url}/v21.0/1/messages", json=text_message("221770000005", "b", "ntf_2"))
        assert (first.status_code, second.status_code) == (200, 400)
        assert httpx.get(f"{url}/stats").json()["pair_limit_hits"] == 1
    finally:
        process.kill()
        process.wait(timeout=10)
