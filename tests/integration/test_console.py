"""The operator console's server side (issue 10), on SQLite and PostgreSQL, through the app in process:
sign-in and its cookie, roles, CSRF, what an agent sees, the actions, languages. The browser tests
(tests/e2e/test_console_browser.py) drive the same pages in a real Chromium."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from dispatchd.app import create_app
from dispatchd.dispatcher.models import Presence
from dispatchd.notifications import outbox
from dispatchd.notifications.delivery import DeliveryWorker
from dispatchd.notifications.outbox import Message
from tests.conftest import ADMIN_KEY, booking_data, driver_data, new_phone
from tests.integration.test_outbox_delivery import FlakyChannel


@pytest.fixture
async def browser(services, settings, clock):
    """A client without an API key, as a browser is: it holds only the console's cookies."""
    app = create_app(settings, clock=clock, run_migrations=False, background=False, services=services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http


async def sign_in(http: httpx.AsyncClient, key: str, **headers: str) -> httpx.Response:
    form = await http.get("/console/sign-in", headers=headers)
    token = re.search(r'name="sign_in_token" value="([^"]+)"', form.text).group(1)
    return await http.post("/console/sign-in", data={"api_key": key, "sign_in_token": token}, headers=headers)


def csrf_of(page: httpx.Response) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


async def new_key(services, role: str, subject: str | None = None) -> str:
    from dispatchd.core import auth

    async with services.db.transaction() as session:
        _, key = await auth.create_key(session, auth.Role(role), subject=subject)
    return key


async def test_sign_in_exchanges_the_key_for_a_strict_http_only_cookie_and_sign_out_ends_it(browser):
    assert (await browser.get("/console/matching")).headers["location"] == "/console/sign-in"
    answer = await sign_in(browser, ADMIN_KEY)
    assert (answer.status_code, answer.headers["location"]) == (303, "/console/matching")
    cookie = answer.headers["set-cookie"]
    assert "dispatchd_console=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/console" in cookie and "Secure" not in cookie  # plain http here
    assert ADMIN_KEY not in cookie
    page = await browser.get("/console/matching")
    assert page.status_code == 200 and "Content-Security-Policy" in page.headers
    assert ADMIN_KEY not in page.text
    out = await browser.post("/console/sign-out", data={"csrf_token": csrf_of(page)})
    assert out.headers["location"] == "/console/sign-in"
    assert (await browser.get("/console/matching")).status_code == 303


async def test_the_cookie_is_secure_behind_https(browser):
    answer = await sign_in(browser, ADMIN_KEY)
    assert "Secure" not in answer.headers["set-cookie"]
    browser.base_url = "https://test"
    answer = await sign_in(browser, ADMIN_KEY)
    assert "Secure" in answer.headers["set-cookie"]


async def test_wrong_keys_and_driver_keys_are_refused(browser, services):
    wrong = await sign_in(browser, "dk_not_a_key")
    assert wrong.status_code == 401 and "dispatchd_console=" not in wrong.headers.get("set-cookie", "")
    driver = await services.matching.create_driver(driver_data())
    refused = await sign_in(browser, await new_key(services, "driver", f"driver:{driver.id}"))
    assert refused.status_code == 403
    assert (await browser.get("/console/matching")).status_code == 303


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(browser, services):
    await sign_in(browser, ADMIN_KEY)
    booking = await services.matching.create_booking(booking_data())
    await services.matching.create_driver(driver_data())
    await services.matching.start_matching(booking.id)
    for token in ("", "forged"):
        refused = await browser.post(f"/console/bookings/{booking.id}/cancel", data={"csrf_token": token})
        assert refused.status_code == 403
    assert (await services.matching.get_booking(booking.id)).status == "SEARCHING"
    page = await browser.get("/console/matching")
    assert f'id="booking-{booking.id}"' in page.text
    done = await browser.post(f"/console/bookings/{booking.id}/cancel", data={"csrf_token": csrf_of(page)})
    assert done.status_code == 303
    assert (await services.matching.get_booking(booking.id)).status == "CANCELLED"
    # htmx sends the token as a header instead
    second = await services.matching.create_booking(booking_data())
    await services.matching.start_matching(second.id)
    answer = await browser.post(
        f"/console/bookings/{second.id}/cancel", headers={"X-CSRF-Token": csrf_of(page), "HX-Request": "true"}
    )
    assert answer.status_code == 204


async def test_a_sign_in_form_needs_its_own_token(browser):
    await browser.get("/console/sign-in")
    refused = await browser.post("/console/sign-in", data={"api_key": ADMIN_KEY, "sign_in_token": "forged"})
    assert refused.status_code == 403


async def test_an_agent_sees_its_own_conversations_only_and_answers_through_the_outbox(browser, services):
    agents = [
        (await services.dispatcher.create_agent({"name": name, "phone": new_phone()})).id
        for name in ("Awa", "Bintou")
    ]
    for agent_id in agents:
        await services.dispatcher.set_presence(agent_id, Presence.ONLINE)
    phones = [new_phone(), new_phone()]
    conversations = [await services.dispatcher.message_in(phone, "Bonjour") for phone in phones]
    mine = next(c for c in conversations if c.agent_id == agents[0])
    theirs = next(c for c in conversations if c.agent_id == agents[1])
    await sign_in(browser, await new_key(services, "agent", f"agent:{agents[0]}"))
    page = await browser.get("/console/conversations")
    assert page.status_code == 200
    assert f"conversation-{mine.id}" in page.text and f"conversation-{theirs.id}" not in page.text
    assert (await browser.get("/console/matching")).status_code == 403  # staff pages
    other = await browser.get(f"/console/conversations?conversation={theirs.id}")
    assert 'id="reply-body"' not in other.text
    token = csrf_of(page)
    refused = await browser.post(
        f"/console/conversations/{theirs.id}/reply", data={"body": "pas à moi", "csrf_token": token}
    )
    assert refused.status_code == 403
    sent = await browser.post(
        f"/console/conversations/{mine.id}/reply", data={"body": "Je m'en occupe", "csrf_token": token}
    )
    assert sent.status_code == 303
    rows = await _outbox(services, mine.customer_phone)
    assert [(row["category"], row["body"]) for row in rows] == [("conversation_reply", "Je m'en occupe")]
    thread = await browser.get(f"/console/fragments/thread?conversation_id={mine.id}")
    assert "Je m&#39;en occupe" in thread.text


async def test_an_admin_retries_a_failed_notification_and_replays_failures(browser, services):
    async with services.db.transaction() as session:
        [failed_id] = await outbox.enqueue(
            session, [Message(recipient="+221700000009", category="x", body="hi")]
        )
    await DeliveryWorker(services.db, FlakyChannel(failures=1, permanent=True)).run_once()
    await sign_in(browser, ADMIN_KEY)
    page = await browser.get("/console/notifications")
    assert f'id="notification-{failed_id}" data-status="FAILED_PERMANENT"' in page.text
    retried = await browser.post(
        f"/console/notifications/{failed_id}/retry", data={"csrf_token": csrf_of(page)}
    )
    assert retried.status_code == 303
    async with services.db.read() as session:
        from dispatchd.notifications.models import Notification

        assert (await session.get(Notification, failed_id)).status == "PENDING"
    again = await browser.post(
        f"/console/notifications/{failed_id}/retry", data={"csrf_token": csrf_of(page)}
    )
    assert again.status_code == 409 and "INVALID_STATE" in again.text


async def test_resizing_closing_and_reopening_are_for_admins_and_audited(browser, services):
    from dispatchd.reservations.models import Resource

    resource = await services.reservations.create_resource(
        {"type": "seat", "name": "Bus 12", "capacity": 10}, actor="test"
    )
    await sign_in(browser, await new_key(services, "integration"))
    page = await browser.get("/console/reservations")
    assert "Bus 12" in page.text and "/resize" not in page.text
    refused = await browser.post(
        f"/console/resources/{resource.id}/close",
        data={"csrf_token": csrf_of(await browser.get("/console/health"))},
    )
    assert refused.status_code == 403
    browser.cookies.clear()
    await sign_in(browser, ADMIN_KEY)
    token = csrf_of(await browser.get("/console/reservations"))
    assert (
        await browser.post(
            f"/console/resources/{resource.id}/resize", data={"capacity": 12, "csrf_token": token}
        )
    ).status_code == 303
    assert (
        await browser.post(f"/console/resources/{resource.id}/close", data={"csrf_token": token})
    ).status_code == 303
    async with services.db.read() as session:
        row = await session.get(Resource, resource.id)
    assert (row.capacity, row.state) == (12, "CLOSED")
    audit = await services.reservations.audit_log(target_id=resource.id)
    assert any("console:" in str(entry.actor) for entry in audit)


async def test_french_by_default_english_by_accept_language_or_by_the_switch(browser):
    french = await browser.get("/console/sign-in")
    assert french.headers["content-language"] == "fr" and '<html lang="fr">' in french.text
    assert french.headers["vary"] == "Accept-Language, Cookie"
    english = await browser.get("/console/sign-in", headers={"Accept-Language": "en-GB,en;q=0.9,fr;q=0.5"})
    assert english.headers["content-language"] == "en" and "Sign in" in english.text
    assert french.text != english.text
    switched = await browser.get("/console/language/en?back=/console/sign-in")
    assert switched.status_code == 303 and "dispatchd_lang=en" in switched.headers["set-cookie"]
    assert (await browser.get("/console/sign-in")).headers["content-language"] == "en"
    offsite = await browser.get("/console/language/fr?back=https://evil.example/")
    assert offsite.headers["location"] == "/console"


async def test_fragments_and_tokens_need_a_session(browser):
    fragment = await browser.get("/console/fragments/searches", headers={"HX-Request": "true"})
    assert (fragment.status_code, fragment.headers.get("hx-redirect")) == (401, "/console/sign-in")
    assert (await browser.get("/console/stream-token")).status_code == 303
    await sign_in(browser, ADMIN_KEY)
    token = await browser.get("/console/stream-token")
    assert token.status_code == 200 and token.json()["token"]


async def _outbox(services, phone: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from dispatchd.notifications.models import Notification

    async with services.db.read() as session:
        rows = (await session.scalars(select(Notification).where(Notification.recipient == phone))).all()
    return [{"category": row.category, "body": row.body} for row in rows if row.category != "pending_notice"]
