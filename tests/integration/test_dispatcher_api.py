"""The dispatcher's HTTP surface (seed 001): who may call what, and the shapes answered."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select

from dispatchd.dispatcher.stats import pending_peak
from dispatchd.notifications.models import Notification
from tests.conftest import new_phone

AGENT_FIELDS = {
    "id",
    "name",
    "phone",
    "email",
    "capacity",
    "presence",
    "open_conversations",
    "last_heartbeat_at",
    "connected_at",
    "created_at",
}


async def _agent(client: httpx.AsyncClient, name: str = "Awa", **fields: Any) -> dict[str, Any]:
    created = await client.post("/v1/agents", json={"name": name, "phone": new_phone(), **fields})
    assert created.status_code == 201, created.text
    return created.json()


async def _key(client: httpx.AsyncClient, agent_id: str) -> dict[str, str]:
    created = await client.post("/v1/api-keys", json={"role": "agent", "subject": f"agent:{agent_id}"})
    assert created.status_code == 201, created.text
    return {"Authorization": f"Bearer {created.json()['key']}"}


async def _online(client: httpx.AsyncClient, agent_id: str) -> dict[str, Any]:
    answer = await client.post(f"/v1/agents/{agent_id}/presence", json={"status": "ONLINE"})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _inbound(client: httpx.AsyncClient, phone: str, body: str = "Bonjour") -> dict[str, Any]:
    answer = await client.post("/v1/conversations/inbound", json={"customer_phone": phone, "body": body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _code(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()["code"]


async def test_an_agent_key_acts_only_as_its_own_agent(client):
    mine, other = (
        await _agent(client, "Awa", email="awa@example.com", capacity=3),
        await _agent(client, "Bintou"),
    )
    assert set(mine) == AGENT_FIELDS
    assert (mine["presence"], mine["capacity"], mine["open_conversations"]) == ("OFFLINE", 3, 0)
    as_mine = await _key(client, mine["id"])

    assert (await client.get(f"/v1/agents/{mine['id']}", headers=as_mine)).json()["id"] == mine["id"]
    online = await client.post(
        f"/v1/agents/{mine['id']}/presence", json={"status": "ONLINE"}, headers=as_mine
    )
    assert online.json()["presence"] == "ONLINE" and online.json()["connected_at"] is not None
    assert (await client.post(f"/v1/agents/{mine['id']}/heartbeat", headers=as_mine)).status_code == 200

    for request in (
        client.get(f"/v1/agents/{other['id']}", headers=as_mine),
        client.post(f"/v1/agents/{other['id']}/presence", json={"status": "ONLINE"}, headers=as_mine),
        client.post(f"/v1/agents/{other['id']}/heartbeat", headers=as_mine),
        client.patch(f"/v1/agents/{mine['id']}", json={"capacity": 50}, headers=as_mine),
        client.get("/v1/agents", headers=as_mine),
        client.post("/v1/agents", json={"name": "X", "phone": new_phone()}, headers=as_mine),
        client.post(
            "/v1/conversations/inbound", json={"customer_phone": new_phone(), "body": "x"}, headers=as_mine
        ),
        client.get("/v1/dispatcher/queue", headers=as_mine),
        client.post("/v1/dispatcher/distribute", headers=as_mine),
        client.get("/v1/dispatcher/stats", headers=as_mine),
    ):
        assert _code(await request, 403) == "FORBIDDEN"
    # the agent was not moved by the refused presence change
    assert (await client.get(f"/v1/agents/{other['id']}")).json()["presence"] == "OFFLINE"

    # staff: capacity, listing, errors
    patched = await client.patch(f"/v1/agents/{mine['id']}", json={"capacity": 5})
    assert patched.json()["capacity"] == 5
    assert {a["id"] for a in (await client.get("/v1/agents")).json()} == {mine["id"], other["id"]}
    assert _code(await client.get("/v1/agents/agt_missing"), 404) == "AGENT_NOT_FOUND"
    assert _code(await client.post(f"/v1/agents/{other['id']}/heartbeat"), 409) == "INVALID_STATE"
    for body in (
        {"name": "No contact"},
        {"name": "Bad phone", "phone": "0612345678"},
        {"name": "Bad email", "email": "not-an-email"},
        {"name": "Zero", "phone": new_phone(), "capacity": 0},
        {"name": "Huge", "phone": new_phone(), "capacity": 1001},
        {"name": "x" * 201, "phone": new_phone()},
        {"name": "Extra", "phone": new_phone(), "presence": "ONLINE"},
    ):
        assert _code(await client.post("/v1/agents", json=body), 422) == "VALIDATION_ERROR", body
    bad_status = await client.post(f"/v1/agents/{mine['id']}/presence", json={"status": "BUSY"})
    assert _code(bad_status, 422) == "VALIDATION_ERROR"


async def test_a_message_goes_to_the_only_online_agent_and_the_reply_reaches_the_customer(
    client, services, clock
):
    online, _offline = await _agent(client, "Awa"), await _agent(client, "Bintou")
    await _online(client, online["id"])
    as_online = await _key(client, online["id"])
    phone = new_phone()

    conversation = await _inbound(client, phone, "Bonjour, ma commande ?")
    assert (conversation["status"], conversation["agent_id"]) == ("ASSIGNED", online["id"])
    assert conversation["customer_phone"] == phone and conversation["first_assigned_at"] is not None
    assert (await client.get(f"/v1/agents/{online['id']}")).json()["open_conversations"] == 1
    # a second message of the same customer stays in the same conversation, with the same agent
    assert (await _inbound(client, phone, "Vous êtes là ?"))["id"] == conversation["id"]

    clock.advance(30)
    url = f"/v1/conversations/{conversation['id']}/messages"
    sent = await client.post(url, json={"body": "Oui, je regarde."}, headers=as_online)
    assert sent.status_code == 201, sent.text
    message = sent.json()
    assert (message["direction"], message["agent_id"], message["body"]) == (
        "OUT",
        online["id"],
        "Oui, je regarde.",
    )
    async with services.db.read() as session:
        notification = await session.scalar(
            select(Notification).where(Notification.id == message["notification_id"])
        )
    assert notification is not None
    assert (notification.recipient, notification.category, notification.body) == (
        phone,
        "conversation_reply",
        "Oui, je regarde.",
    )
    assert notification.subject == f"conversation:{conversation['id']}"

    thread = (await client.get(url, headers=as_online)).json()
    assert [(m["direction"], m["body"]) for m in thread] == [
        ("IN", "Bonjour, ma commande ?"),
        ("IN", "Vous êtes là ?"),
        ("OUT", "Oui, je regarde."),
    ]
    read = (await client.get(f"/v1/conversations/{conversation['id']}", headers=as_online)).json()
    assert read["first_reply_at"] is not None and read["awaiting_reply_since"] is None

    # staff may answer too (no agent named); bodies are bounded
    by_staff = await client.post(url, json={"body": "Le service client."})
    assert by_staff.status_code == 201 and by_staff.json()["agent_id"] is None
    assert _code(await client.post(url, json={"body": "x" * 4097}), 422) == "VALIDATION_ERROR"
    assert _code(await client.post(url, json={"body": ""}), 422) == "VALIDATION_ERROR"
    too_long = {"customer_phone": new_phone(), "body": "x" * 4097}
    assert _code(await client.post("/v1/conversations/inbound", json=too_long), 422) == "VALIDATION_ERROR"
    bad_phone = {"customer_phone": "12345", "body": "x"}
    assert _code(await client.post("/v1/conversations/inbound", json=bad_phone), 422) == "VALIDATION_ERROR"
    missing = "/v1/conversations/cnv_missing/messages"
    assert _code(await client.post(missing, json={"body": "x"}), 404) == "CONVERSATION_NOT_FOUND"


async def test_an_agent_reads_and_acts_on_its_own_conversations_only(client):
    first, second = await _agent(client, "Awa"), await _agent(client, "Bintou")
    await _online(client, first["id"])
    await _online(client, second["id"])
    as_first = await _key(client, first["id"])
    mine = await _inbound(client, new_phone())
    theirs = await _inbound(client, new_phone())
    assert (mine["agent_id"], theirs["agent_id"]) == (first["id"], second["id"])  # round-robin

    assert (await client.get(f"/v1/conversations/{mine['id']}", headers=as_first)).status_code == 200
    assert (await client.get(f"/v1/conversations/{mine['id']}/messages", headers=as_first)).status_code == 200
    for request in (
        client.get(f"/v1/conversations/{theirs['id']}", headers=as_first),
        client.get(f"/v1/conversations/{theirs['id']}/messages", headers=as_first),
        client.post(f"/v1/conversations/{theirs['id']}/messages", json={"body": "x"}, headers=as_first),
        client.post(f"/v1/conversations/{theirs['id']}/close", headers=as_first),
        client.post(
            f"/v1/conversations/{mine['id']}/assign", json={"agent_id": first["id"]}, headers=as_first
        ),
        client.get("/v1/conversations", params={"agent_id": second["id"]}, headers=as_first),
    ):
        assert _code(await request, 403) == "FORBIDDEN"

    listed = (await client.get("/v1/conversations", headers=as_first)).json()
    assert [c["id"] for c in listed] == [mine["id"]]
    assert {c["id"] for c in (await client.get("/v1/conversations")).json()} == {mine["id"], theirs["id"]}
    by_agent = await client.get("/v1/conversations", params={"agent_id": second["id"], "status": "ASSIGNED"})
    assert [c["id"] for c in by_agent.json()] == [theirs["id"]]
    assert _code(await client.get("/v1/conversations", params={"status": "OPEN"}), 422) == "VALIDATION_ERROR"
    assert _code(await client.get("/v1/conversations", params={"limit": 0}), 422) == "VALIDATION_ERROR"

    # the agent closes its own conversation; then it is no longer counted in its load
    closed = await client.post(f"/v1/conversations/{mine['id']}/close", headers=as_first)
    assert (closed.json()["status"], closed.json()["close_reason"]) == ("CLOSED", "closed by agent")
    assert (await client.get(f"/v1/agents/{first['id']}")).json()["open_conversations"] == 0
    replied = await client.post(
        f"/v1/conversations/{mine['id']}/messages", json={"body": "x"}, headers=as_first
    )
    assert _code(replied, 409) == "INVALID_STATE"


async def test_the_queue_lists_agents_in_rotation_order(client):
    first, second, away = (
        await _agent(client, "Awa"),
        await _agent(client, "Bintou"),
        await _agent(client, "Coumba"),
    )
    await _online(client, first["id"])
    await _online(client, second["id"])
    queue = (await client.get("/v1/dispatcher/queue")).json()
    assert [(q["position"], q["agent_id"]) for q in queue] == [
        (1, first["id"]),
        (2, second["id"]),
        (None, away["id"]),
    ]
    assert set(queue[0]) == {"position", "agent_id", "name", "presence", "load", "capacity"}
    assert (queue[0]["presence"], queue[0]["load"], queue[0]["capacity"]) == ("ONLINE", 0, 10)

    await _inbound(client, new_phone())  # the head takes it and goes to the end
    queue = (await client.get("/v1/dispatcher/queue")).json()
    assert [(q["position"], q["agent_id"], q["load"]) for q in queue[:2]] == [
        (1, second["id"], 0),
        (2, first["id"], 1),
    ]


async def test_pending_distribution_transfer_and_close(client, services):
    phone = new_phone()
    held = await _inbound(client, phone)
    assert (held["status"], held["agent_id"], held["pending_notice_sent"]) == ("PENDING", None, True)
    async with services.db.read() as session:
        notices = (
            await session.scalars(
                select(Notification).where(Notification.category == "conversation_pending_notice")
            )
        ).all()
    assert [n.recipient for n in notices] == [phone]
    assert (await client.post("/v1/dispatcher/distribute")).json() == {"assigned": 0}

    first, second = await _agent(client, "Awa"), await _agent(client, "Bintou")
    await _online(client, first["id"])  # connecting takes the pending conversation
    assert (await client.get(f"/v1/conversations/{held['id']}")).json()["agent_id"] == first["id"]

    url = f"/v1/conversations/{held['id']}/assign"
    assert _code(await client.post(url, json={"agent_id": second["id"]}), 409) == "AGENT_UNAVAILABLE"
    assert _code(await client.post(url, json={"agent_id": "agt_missing"}), 404) == "AGENT_NOT_FOUND"
    missing = "/v1/conversations/cnv_missing/assign"
    assert _code(await client.post(missing, json={"agent_id": first["id"]}), 404) == "CONVERSATION_NOT_FOUND"
    await _online(client, second["id"])
    moved = (await client.post(url, json={"agent_id": second["id"]})).json()
    assert (moved["agent_id"], moved["reassignments"]) == (second["id"], 1)
    loads = {a["id"]: a["open_conversations"] for a in (await client.get("/v1/agents")).json()}
    assert loads == {first["id"]: 0, second["id"]: 1}

    closed = (await client.post(f"/v1/conversations/{held['id']}/close")).json()
    assert (closed["status"], closed["close_reason"]) == ("CLOSED", "closed by staff")
    assert _code(await client.post(url, json={"agent_id": first["id"]}), 409) == "INVALID_STATE"
    assert _code(await client.get("/v1/conversations/cnv_missing"), 404) == "CONVERSATION_NOT_FOUND"


async def test_stats_shape(client, clock):
    start = clock.now()
    first, second = await _agent(client, "Awa"), await _agent(client, "Bintou")
    held = [await _inbound(client, new_phone()) for _ in range(2)]  # nobody online: two pending
    clock.advance(60)
    await _online(client, first["id"])  # takes both
    clock.advance(30)
    await client.post(f"/v1/conversations/{held[0]['id']}/messages", json={"body": "Bonjour"})
    await _online(client, second["id"])
    await client.post(f"/v1/conversations/{held[1]['id']}/assign", json={"agent_id": second["id"]})
    clock.advance(1)

    answer = await client.get("/v1/dispatcher/stats", params={"from": start.isoformat()})
    assert answer.status_code == 200, answer.text
    stats = answer.json()
    assert set(stats) == {
        "from",
        "to",
        "conversations_opened",
        "assignments",
        "time_to_assign_s",
        "time_to_first_reply_s",
        "reassignments",
        "pending",
    }
    assert stats["conversations_opened"] == 2
    per_agent = {row["agent_id"]: row["assignments"] for row in stats["assignments"]["per_agent"]}
    assert per_agent == {first["id"]: 2, second["id"]: 1}
    assert stats["assignments"]["total"] == 3 and stats["assignments"]["spread"] == 1
    assert stats["time_to_assign_s"] == {"count": 2, "p50": 60.0, "p95": 60.0}
    assert stats["time_to_first_reply_s"] == {"count": 1, "p50": 90.0, "p95": 90.0}
    assert stats["reassignments"]["total"] == 1
    [reason] = stats["reassignments"]["by_reason"]
    assert reason.startswith("transfer by admin:key_")
    assert stats["pending"] == {"now": 0, "at_start": 0, "peak": 2, "peak_at": stats["from"]}

    # a window that starts while both were pending
    later = (start + timedelta(seconds=30)).isoformat()
    windowed = (await client.get("/v1/dispatcher/stats", params={"from": later})).json()
    assert windowed["pending"]["at_start"] == 2 and windowed["conversations_opened"] == 0

    for params in ({"from": later, "to": later}, {"from": "2026-01-05T08:00:00"}, {"to": "yesterday"}):
        assert _code(await client.get("/v1/dispatcher/stats", params=params), 422) == "VALIDATION_ERROR"


def test_pending_peak_replays_the_events_in_order():
    from datetime import UTC, datetime

    t = [datetime(2026, 1, 5, 8, minute, tzinfo=UTC) for minute in range(10)]
    events = [
        ("old", "ConversationAssigned", t[1], "agt_a", None),  # pending before the range
        ("new", "ConversationOpened", t[2], None, None),
        ("new", "ConversationPending", t[2], None, None),
        ("x", "ConversationReassigned", t[3], None, "agt_a"),  # from an agent to pending
        ("x", "ConversationPending", t[3], None, None),
        ("new", "ConversationClosed", t[4], None, None),
        ("x", "ConversationAssigned", t[9], "agt_b", None),  # after the end
    ]
    assert pending_peak(events, {"still"}, end=t[8]) == {"at_start": 2, "peak": 3, "peak_at": t[3]}
    assert pending_peak(events, set(), end=t[8]) == {"at_start": 1, "peak": 2, "peak_at": t[3]}
