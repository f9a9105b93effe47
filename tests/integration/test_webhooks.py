"""WhatsApp webhooks: the handshake, the signature, out-of-order statuses, stored-once inbound messages and
driver button taps routed to matching. Payloads are pywa's real-shaped test data (tests/data/whatsapp)."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from dispatchd.app import create_app
from dispatchd.notifications import outbox, webhooks
from dispatchd.notifications.models import InboundMessage, Notification
from dispatchd.notifications.outbox import Message
from tests.conftest import driver_data, make_settings
from tests.factories import create_booking, create_driver, create_drivers

SECRET = "s3cret"
VERIFY_TOKEN = "verify-me"
URL = "/v1/webhooks/whatsapp"
DATA = Path(__file__).resolve().parents[1] / "data" / "whatsapp"
T0 = 1_767_600_000  # 2026-01-05 08:00:00 UTC, unix seconds


@cache
def _file(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def payload(name: str, case: str) -> dict[str, Any]:
    """A fresh copy of one whole webhook envelope from tests/data/whatsapp/<name>."""
    return copy.deepcopy(_file(name)[case])


def _values(envelope: dict[str, Any]) -> list[dict[str, Any]]:
    return [change["value"] for entry in envelope["entry"] for change in entry["changes"]]


def messages_of(envelope: dict[str, Any]) -> list[dict[str, Any]]:
    return [message for value in _values(envelope) for message in value.get("messages", [])]


def statuses_of(envelope: dict[str, Any]) -> list[dict[str, Any]]:
    return [status for value in _values(envelope) for status in value.get("statuses", [])]


def new_wamid() -> str:
    # pywa's cases all reuse wamid.xyzxyz; every delivery in these tests gets its own
    return f"wamid.{uuid.uuid4().hex}"


def status_payload(case: str, wamid: str, timestamp: int | None = None) -> dict[str, Any]:
    envelope = payload("message_status.json", case)
    [status] = statuses_of(envelope)
    status["id"] = wamid
    if timestamp is not None:
        status["timestamp"] = str(timestamp)
    return envelope


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def post(
    http: httpx.AsyncClient, envelope: dict[str, Any] | bytes, *, signature: str | None = ""
) -> httpx.Response:
    """POST a delivery as Meta does: raw JSON bytes, signed unless ``signature`` is given (None: none)."""
    body = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    headers = {"Content-Type": "application/json"}
    if signature == "":
        headers[webhooks.SIGNATURE_HEADER] = sign(body)
    elif signature is not None:
        headers[webhooks.SIGNATURE_HEADER] = signature
    return await http.post(URL, content=body, headers=headers)


def _assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["status"] == status
    return body


def _app(db_url: str, services, clock, **overrides: object) -> FastAPI:
    """An app on ``services`` whose settings carry ``overrides`` (the webhook reads the secrets, the
    templates and the routing mode from ``services.settings`` at each request)."""
    services.settings = make_settings(db_url, **overrides)
    return create_app(
        services.settings, clock=clock, run_migrations=False, background=False, services=services
    )


async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    # No API key: Meta calls these routes, the signature is the authentication.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


@pytest.fixture
async def hooks(db_url, services, clock) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app configured with an app secret and a verify token (sharing ``services``)."""
    app = _app(db_url, services, clock, whatsapp_app_secret=SECRET, whatsapp_verify_token=VERIFY_TOKEN)
    async for http in _client(app):
        yield http


@pytest.fixture
async def unconfigured(db_url, services, clock) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _client(_app(db_url, services, clock)):
        yield http


async def inbound(services, wamid: str) -> list[InboundMessage]:
    async with services.db.read() as session:
        rows = await session.scalars(
            select(InboundMessage).where(InboundMessage.provider_message_id == wamid)
        )
        return list(rows.all())


async def state(services) -> tuple[int, list[tuple]]:
    """(inbound message rows, every notification's status columns): unchanged means nothing was written."""
    async with services.db.read() as session:
        count = await session.scalar(select(func.count()).select_from(InboundMessage))
        rows = await session.execute(
            select(Notification.id, Notification.status, Notification.status_at).order_by(Notification.id)
        )
        return int(count or 0), [tuple(row) for row in rows.all()]


async def sent_notification(services, wamid: str) -> str:
    """An outbox row as the delivery worker leaves it after a successful send: SENT with the wamid."""
    async with services.db.transaction() as session:
        [notification_id] = await outbox.enqueue(
            session, [Message(recipient="+221700000000", category="driver_offer", body="Nouvelle course")]
        )
        await session.execute(
            update(Notification)
            .where(Notification.id == notification_id)
            .values(
                status="SENT", sent_at=session.info["now"], next_attempt_at=None, provider_message_id=wamid
            )
        )
    return notification_id


async def notification(services, notification_id: str) -> Notification:
    async with services.db.read() as session:
        return await session.get_one(Notification, notification_id)


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# ------------------------------------------------------------------------------------ verification


async def test_verification_handshake_echoes_the_challenge(hooks):
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    response = await hooks.get(URL, params=params)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "1158201444"


async def test_verification_with_a_wrong_token_or_mode_is_403(hooks):
    wrong_token = {"hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "echo-me-not"}
    response = await hooks.get(URL, params=wrong_token)
    _assert_problem(response, 403, "FORBIDDEN")
    assert "echo-me-not" not in response.text
    wrong_mode = {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "42"}
    _assert_problem(await hooks.get(URL, params=wrong_mode), 403, "FORBIDDEN")
    _assert_problem(await hooks.get(URL, params={"hub.challenge": "42"}), 403, "FORBIDDEN")


async def test_without_secrets_configured_both_routes_are_503(unconfigured, services):
    before = await state(services)
    params = {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "42"}
    _assert_problem(await unconfigured.get(URL, params=params), 503, "WEBHOOK_NOT_CONFIGURED")
    _assert_problem(await post(unconfigured, payload("message.json", "text")), 503, "WEBHOOK_NOT_CONFIGURED")
    assert await state(services) == before


# --------------------------------------------------------------------------------------- signature


async def test_missing_or_wrong_signature_is_refused_and_changes_nothing(hooks, services):
    wamid = new_wamid()
    notification_id = await sent_notification(services, wamid)
    envelope = payload("message.json", "text")
    messages_of(envelope)[0]["id"] = new_wamid()
    envelope["entry"][0]["changes"][0]["value"]["statuses"] = statuses_of(status_payload("read", wamid, T0))
    body = json.dumps(envelope).encode()
    before = await state(services)

    _assert_problem(await post(hooks, body, signature=None), 401, "UNAUTHORIZED")
    _assert_problem(await post(hooks, body, signature=sign(body, "not-the-secret")), 403, "FORBIDDEN")
    _assert_problem(await post(hooks, body, signature=sign(body + b" ")), 403, "FORBIDDEN")  # tampered
    _assert_problem(await post(hooks, body, signature="sha1=" + "0" * 40), 403, "FORBIDDEN")
    _assert_problem(await post(hooks, b'{"object": ', signature=None), 401, "UNAUTHORIZED")  # auth first

    assert await state(services) == before
    assert (await notification(services, notification_id)).status == "SENT"


async def test_malformed_json_or_wrong_shape_with_a_valid_signature_is_400_and_changes_nothing(
    hooks, services
):
    before = await state(services)
    _assert_problem(await post(hooks, b'{"object": "whatsapp_business_account", '), 400, "MALFORMED_JSON")
    _assert_problem(await post(hooks, b"\xff\xfe not utf-8"), 400, "MALFORMED_JSON")
    _assert_problem(await post(hooks, {"object": "page", "entry": []}), 400, "VALIDATION_ERROR")
    _assert_problem(await post(hooks, [1, 2]), 400, "VALIDATION_ERROR")
    _assert_problem(await post(hooks, {"object": "whatsapp_business_account"}), 400, "VALIDATION_ERROR")
    # one good message next to a status without id: the whole delivery is refused, nothing half-applied
    envelope = payload("message.json", "text")
    messages_of(envelope)[0]["id"] = good = new_wamid()
    broken = statuses_of(status_payload("sent", "x", T0))[0]
    del broken["id"]
    envelope["entry"][0]["changes"][0]["value"]["statuses"] = [broken]
    body = _assert_problem(await post(hooks, envelope), 400, "VALIDATION_ERROR")
    assert "statuses[0].id" in body["detail"]
    assert await inbound(services, good) == []
    assert await state(services) == before


# ---------------------------------------------------------------------------------------- messages


async def test_a_text_message_is_stored_once_and_a_redelivery_is_a_duplicate(hooks, services, clock):
    envelope = payload("message.json", "text")
    [message] = messages_of(envelope)
    message["id"] = wamid = new_wamid()

    first = await post(hooks, envelope)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "received": True,
        "rejected": False,
        "statuses": 0,
        "messages": 1,
        "duplicates": 0,
        "unmatched": 0,
    }
    again = await post(hooks, envelope)  # Meta re-delivers when it did not see our 200 in time
    assert again.json() == {
        "received": True,
        "rejected": False,
        "statuses": 0,
        "messages": 1,
        "duplicates": 1,
        "unmatched": 0,
    }

    [row] = await inbound(services, wamid)
    assert row.id.startswith("inb_")
    assert (row.from_phone, row.type, row.text) == ("+972987654321", "text", "Body Text")
    assert row.button_id is None and row.context_message_id is None
    assert row.sent_at == at(1697043223)
    assert row.received_at == clock.now()
    # no offer button: matching passes it on, the dispatcher holds it (no agent is online)
    assert (row.routing_status, row.handler, row.outcome) == (
        "ROUTED",
        "dispatcher.customer_message",
        "PENDING",
    )
    assert row.raw == message


async def test_every_pywa_message_kind_is_stored(hooks, services):
    cases = [("message.json", case) for case in _file("message.json")]
    cases += [("callback_selection.json", case) for case in _file("callback_selection.json")]
    cases += [("callback_button.json", case) for case in _file("callback_button.json")]
    stored: dict[str, InboundMessage] = {}
    for name, case in cases:
        envelope = payload(name, case)
        [message] = messages_of(envelope)
        message["id"] = wamid = new_wamid()
        response = await post(hooks, envelope)
        assert response.status_code == 200, (case, response.text)
        assert response.json()["messages"] == 1 and response.json()["duplicates"] == 0
        [stored[case]] = await inbound(services, wamid)

    assert (stored["image"].type, stored["image"].text) == ("image", None)
    assert stored["video"].text == "caption"
    assert (stored["reply"].text, stored["reply"].context_message_id) == ("replied text", "wamid.xyzxyz==")
    assert stored["unsupported"].type == "unsupported"
    assert stored["interactive_message_with_err"].button_id is None
    assert (stored["callback"].button_id, stored["callback"].text) == ("callback_data", "title")
    assert (stored["button"].type, stored["button"].button_id) == ("interactive", "callback_data")
    assert (stored["quick_reply"].type, stored["quick_reply"].button_id) == ("button", "callback_data")
    # not offer buttons: matching passes them on to the dispatcher
    assert {row.handler for row in stored.values()} == {"dispatcher.customer_message"}


# ---------------------------------------------------------------------------------------- statuses


async def test_statuses_move_a_notification_forward_and_never_back(hooks, services):
    wamid = new_wamid()
    notification_id = await sent_notification(services, wamid)

    async def deliver(case: str, timestamp: int) -> dict:
        response = await post(hooks, status_payload(case, wamid, timestamp))
        assert response.status_code == 200, response.text
        return response.json()

    assert await deliver("sent", T0) == {
        "received": True,
        "rejected": False,
        "statuses": 1,
        "messages": 0,
        "duplicates": 0,
        "unmatched": 0,
    }
    row = await notification(services, notification_id)
    assert (row.status, row.status_at, row.delivered_at) == ("SENT", at(T0), None)

    await deliver("delivered", T0 + 5)
    row = await notification(services, notification_id)
    assert (row.status, row.delivered_at, row.status_at) == ("DELIVERED", at(T0 + 5), at(T0 + 5))

    await deliver("read", T0 + 30)
    row = await notification(services, notification_id)
    assert (row.status, row.read_at, row.status_at) == ("READ", at(T0 + 30), at(T0 + 30))
    assert row.delivered_at == at(T0 + 5)

    # out of order: a late "delivered" (and a late "sent") after "read" change nothing
    await deliver("delivered", T0 + 6)
    await deliver("sent", T0 + 1)
    late = await notification(services, notification_id)
    assert (late.status, late.delivered_at, late.read_at, late.status_at) == (
        "READ",
        at(T0 + 5),
        at(T0 + 30),
        at(T0 + 30),
    )


async def test_read_before_delivered_keeps_read(hooks, services):
    wamid = new_wamid()
    notification_id = await sent_notification(services, wamid)
    assert (await post(hooks, status_payload("read", wamid, T0 + 30))).status_code == 200
    assert (await post(hooks, status_payload("delivered", wamid, T0 + 5))).status_code == 200
    row = await notification(services, notification_id)
    assert (row.status, row.read_at, row.delivered_at, row.status_at) == (
        "READ",
        at(T0 + 30),
        None,
        at(T0 + 30),
    )


async def test_failed_status_is_permanent_unless_already_delivered(hooks, services):
    failing, delivered = new_wamid(), new_wamid()
    failing_id = await sent_notification(services, failing)
    delivered_id = await sent_notification(services, delivered)
    assert (await post(hooks, status_payload("delivered", delivered, T0))).status_code == 200

    envelope = status_payload("failed", failing, T0 + 10)  # pywa's case: error 130472
    value = envelope["entry"][0]["changes"][0]["value"]
    value["statuses"].append({**copy.deepcopy(value["statuses"][0]), "id": delivered})
    response = await post(hooks, envelope)
    assert response.status_code == 200, response.text
    assert response.json()["statuses"] == 2 and response.json()["unmatched"] == 0

    row = await notification(services, failing_id)
    assert (row.status, row.error_code, row.error_kind) == ("FAILED_PERMANENT", "META_130472", "PERMANENT")
    assert "part of an experiment" in row.last_error
    assert row.status_at == at(T0 + 10)
    kept = await notification(services, delivered_id)
    assert (kept.status, kept.error_code, kept.status_at) == ("DELIVERED", None, at(T0))


async def test_statuses_of_unknown_messages_are_counted_unmatched(hooks, services):
    before = await state(services)
    for case in ("sent", "played", "with_tracker", "group", "failed"):
        response = await post(hooks, status_payload(case, new_wamid()))
        assert response.status_code == 200, response.text
        assert (response.json()["statuses"], response.json()["unmatched"]) == (1, 1)
    assert await state(services) == before


# ------------------------------------------------------------------------------------- driver taps


@pytest.fixture
async def searching(services):
    """Two available drivers and one booking being offered to both."""
    drivers = await create_drivers(services, 2)
    booking = await create_booking(services)
    result = await services.matching.start_matching(booking.id)
    assert result.drivers_notified == 2
    return booking.id, drivers


def tap(case: str, phone: str, button_id: str) -> tuple[dict[str, Any], str]:
    """pywa's reply-button (``button``: interactive) or quick-reply (``quick_reply``: button) tap, from
    ``phone`` (E.164) on ``button_id``; returns the envelope and its new wamid."""
    envelope = payload("callback_button.json", case)
    [message] = messages_of(envelope)
    message["from"] = phone.removeprefix("+")
    message["id"] = wamid = new_wamid()
    if message["type"] == "interactive":
        message["interactive"]["button_reply"]["id"] = button_id
    else:
        message["button"]["payload"] = button_id
    return envelope, wamid


async def test_a_driver_tap_assigns_the_booking_once_even_when_redelivered(
    hooks, services, searching, monkeypatch
):
    booking_id, [driver, other] = searching
    calls: list[tuple] = []
    respond_in = services.matching.respond_in

    async def counting_respond(session, *args):
        calls.append(args)
        return await respond_in(session, *args)

    monkeypatch.setattr(services.matching, "respond_in", counting_respond)
    envelope, wamid = tap("button", driver.phone, f"ACCEPT:{booking_id}")

    first = await post(hooks, envelope)
    assert first.status_code == 200, first.text
    assert first.json()["messages"] == 1 and first.json()["duplicates"] == 0
    booking = await services.matching.get_booking(booking_id)
    assert (booking.status, booking.driver_id) == ("ASSIGNED", driver.id)
    assert calls == [(booking_id, driver.id, "ACCEPT")]
    [row] = await inbound(services, wamid)
    assert (row.button_id, row.outcome, row.from_phone) == (f"ACCEPT:{booking_id}", "ASSIGNED", driver.phone)

    # Meta re-delivers the same tap, twice at once: stored once, answered once
    again = await asyncio.gather(post(hooks, envelope), post(hooks, envelope))
    assert [response.json()["duplicates"] for response in again] == [1, 1]
    assert len(calls) == 1
    assert [row.outcome for row in await inbound(services, wamid)] == ["ASSIGNED"]
    assert (await services.matching.get_booking(booking_id)).driver_id == driver.id


async def test_concurrent_first_deliveries_of_one_tap_respond_once(hooks, services, searching, monkeypatch):
    booking_id, [driver, _] = searching
    calls: list[tuple] = []
    respond_in = services.matching.respond_in

    async def counting_respond(session, *args):
        calls.append(args)
        return await respond_in(session, *args)

    monkeypatch.setattr(services.matching, "respond_in", counting_respond)
    envelope, wamid = tap("button", driver.phone, f"ACCEPT:{booking_id}")
    responses = await asyncio.gather(*(post(hooks, envelope) for _ in range(3)))
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    assert sorted(response.json()["duplicates"] for response in responses) == [0, 1, 1]
    assert len(calls) == 1
    assert len(await inbound(services, wamid)) == 1
    assert (await services.matching.get_booking(booking_id)).status == "ASSIGNED"


async def test_tap_outcomes_reject_unknown_driver_and_missing_offer(hooks, services, searching):
    booking_id, [driver, other] = searching
    stranger = driver_data()["phone"]
    cases = [
        (driver.phone, f"REJECT:{booking_id}", "REJECTED"),  # template quick reply (type "button")
        (stranger, f"ACCEPT:{booking_id}", "UNKNOWN_DRIVER"),
        (other.phone, "ACCEPT:bkg_0123456789abcdef", "BOOKING_NOT_FOUND"),
    ]
    for phone, button_id, outcome in cases:
        envelope, wamid = tap("quick_reply", phone, button_id)
        assert (await post(hooks, envelope)).status_code == 200
        [row] = await inbound(services, wamid)
        assert row.outcome == outcome, button_id

    # a driver who was never offered this booking (registered after the wave)
    late = await create_driver(services)
    envelope, wamid = tap("button", late.phone, f"ACCEPT:{booking_id}")
    assert (await post(hooks, envelope)).status_code == 200
    assert [row.outcome for row in await inbound(services, wamid)] == ["OFFER_NOT_FOUND"]
    assert (await services.matching.get_booking(booking_id)).status == "SEARCHING"


async def test_a_late_131047_failure_is_resent_as_the_category_template(db_url, services, clock):
    """Meta may report the closed 24 h window only by webhook: the message goes back to the queue as the
    category's approved template, as a synchronous 131047 would."""
    templates = {"driver_offer": {"name": "nouvelle_course", "language": "fr"}}
    app = _app(
        db_url,
        services,
        clock,
        whatsapp_app_secret=SECRET,
        whatsapp_verify_token=VERIFY_TOKEN,
        whatsapp_templates=templates,
    )
    wamid = new_wamid()
    notification_id = await sent_notification(services, wamid)
    envelope = status_payload("failed", wamid, T0 + 10)
    envelope["entry"][0]["changes"][0]["value"]["statuses"][0]["errors"] = [
        {"code": 131047, "title": "Re-engagement message"}
    ]
    async for http in _client(app):
        assert (await post(http, envelope)).status_code == 200
    row = await notification(services, notification_id)
    assert (row.status, row.error_code, row.error_kind) == ("PENDING", "META_131047", "WINDOW_CLOSED")
    assert row.payload["template"]["name"] == "nouvelle_course" and row.next_attempt_at == at(T0 + 10)
