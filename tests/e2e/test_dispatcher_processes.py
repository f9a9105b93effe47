"""Two ``dispatchd serve`` processes on one PostgreSQL database (issue 8, "Proof"): 2,000 signed WhatsApp
webhook messages from 500 customers, split across both processes by 20 concurrent senders, while agents
connect, step away and disconnect over HTTP on both processes.

Afterwards every agent connects, the inbox is drained, one distribution is forced, and the database is
read directly:

* 0 lost messages: 2,000 inbox rows, all ROUTED by ``dispatcher.customer_message``, each linked to
  exactly one inbound thread message of its own customer's conversation;
* 0 conversations with two agents: one open conversation per customer, and the event history of every
  conversation never hands it to an agent while another holds it (an assignment needs a reassignment
  or a close between), and ends where the row is;
* no agent above capacity, now or at any point of the history; ``agents.open_conversations`` equals its
  ASSIGNED conversations; every ASSIGNED conversation's agent is present; held messages only for PENDING
  conversations and every PENDING conversation has one; nothing PENDING while an ONLINE agent has room.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import pytest
from sqlalchemy import func, select

from dispatchd.core.db import Database
from dispatchd.core.events import Event
from dispatchd.dispatcher.models import (
    Agent,
    Conversation,
    ConversationMessage,
    ConversationStatus,
    Direction,
    PendingMessage,
    Presence,
)
from dispatchd.notifications.models import InboundMessage, RoutingStatus
from dispatchd.replay.conversations import signed_delivery, text_webhook_payload
from tests.conftest import ADMIN_KEY, reset_postgres
from tests.e2e.test_delivery_crash import stop, wait_until
from tests.e2e.test_inbound_crash import serve

SECRET = "dispatcher-e2e-secret"
AGENTS = 8
CAPACITY = 100
CUSTOMERS = 500
MESSAGES = 2000
SENDERS = 20
HANDLER = "dispatcher.customer_message"
ASSIGNED = ConversationStatus.ASSIGNED.value
PENDING = ConversationStatus.PENDING.value


def plan(rng: random.Random) -> list[tuple[str, str, str]]:
    """``(wa_id, wamid, body)`` for 2,000 messages of 500 customers (4 each), shuffled so that one
    customer's messages may reach both processes at once."""
    messages = [
        (f"2217790{customer:05d}", f"wamid.dispatcher-e2e.{customer:03d}.{number}", f"c{customer} m{number}")
        for customer in range(CUSTOMERS)
        for number in range(MESSAGES // CUSTOMERS)
    ]
    rng.shuffle(messages)
    return messages


@pytest.mark.postgres
async def test_two_servers_route_2000_messages_to_one_agent_each(postgres_url, tmp_path):
    started = time.monotonic()
    await reset_postgres(postgres_url)
    rng = random.Random(8)
    env = {
        "DISPATCHD_DATABASE_URL": postgres_url,
        "DISPATCHD_ADMIN_API_KEY": ADMIN_KEY,
        "DISPATCHD_WHATSAPP_APP_SECRET": SECRET,
        "DISPATCHD_AGENT_REPLY_TIMEOUT_S": "0",
        "DISPATCHD_AGENT_PRESENCE_TIMEOUT_S": "3600",
        "DISPATCHD_RATE_LIMIT": "",
        "DISPATCHD_LOG_JSON": "true",
        "DISPATCHD_LOG_LEVEL": "WARNING",
    }
    db = Database(postgres_url)
    processes = []
    clients: list[httpx.AsyncClient] = []
    try:
        started_servers = await asyncio.gather(
            serve(tmp_path, "a", env), serve(tmp_path, "b", env), return_exceptions=True
        )
        processes = [found[0] for found in started_servers if not isinstance(found, BaseException)]
        for found in started_servers:
            if isinstance(found, BaseException):
                raise found
        first, second = started_servers
        ready_s = time.monotonic() - started
        clients = [
            httpx.AsyncClient(
                base_url=url,
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                limits=httpx.Limits(max_connections=SENDERS + 10),
                timeout=60,
            )
            for url in (first[1], second[1])
        ]

        agents = []
        for k in range(AGENTS):
            created = await clients[k % 2].post(
                "/v1/agents",
                json={"name": f"Agent {k}", "email": f"agent{k}@e2e.example", "capacity": CAPACITY},
            )
            assert created.status_code == 201, created.text
            agents.append(created.json()["id"])

        async def presence(client: httpx.AsyncClient, agent_id: str, status: str) -> None:
            answer = await client.post(f"/v1/agents/{agent_id}/presence", json={"status": status})
            assert answer.status_code == 200, answer.text

        for k, agent_id in enumerate(agents):
            await presence(clients[k % 2], agent_id, "ONLINE")

        queue: asyncio.Queue[tuple[int, tuple[str, str, str]]] = asyncio.Queue()
        for item in enumerate(plan(rng)):
            queue.put_nowait(item)
        answers: Counter[int] = Counter()
        base_ts = int(time.time())

        async def sender() -> None:
            while not queue.empty():
                n, (wa_id, wamid, body) = queue.get_nowait()
                payload = text_webhook_payload(
                    from_wa_id=wa_id, wamid=wamid, body=body, timestamp=base_ts + n
                )
                content, headers = signed_delivery(SECRET, payload)
                answer = await clients[n % 2].post("/v1/webhooks/whatsapp", content=content, headers=headers)
                answers[answer.status_code] += 1
                assert answer.status_code == 200, answer.text
                assert answer.json()["messages"] == 1 and answer.json()["duplicates"] == 0

        sending = True
        changes: Counter[str] = Counter()

        async def churn() -> None:
            """Agents connect, step away and disconnect on both processes while messages arrive."""
            while sending:
                k = rng.randrange(AGENTS)
                status = rng.choice(("ONLINE", "ONLINE", "OFFLINE", "OFFLINE", "AWAY"))
                await presence(clients[rng.randrange(2)], agents[k], status)
                changes[status] += 1
                await asyncio.sleep(0.02)

        churning = asyncio.create_task(churn())
        sent_from = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(SENDERS)))
        sending_s = time.monotonic() - sent_from
        sending = False
        await churning
        assert answers == {200: MESSAGES}
        assert changes["OFFLINE"] >= 10 and changes["ONLINE"] >= 10, changes

        async def inbox_drained() -> bool:
            async with db.read() as session:
                left = await session.scalar(
                    select(func.count())
                    .select_from(InboundMessage)
                    .where(InboundMessage.routing_status == RoutingStatus.PENDING.value)
                )
            return left == 0

        await wait_until(inbox_drained, 60, "no inbound message left PENDING", interval_s=0.2)
        pending_before = await count_pending(db)
        for k, agent_id in enumerate(agents):
            await presence(clients[k % 2], agent_id, "ONLINE")
        distributed = await clients[0].post("/v1/dispatcher/distribute")
        assert distributed.status_code == 200, distributed.text
        print(
            f"\n{MESSAGES} messages sent in {sending_s:.1f} s (servers ready after {ready_s:.1f} s); "
            f"presence changes {dict(changes)}; conversations PENDING after the traffic: {pending_before}; "
            f"assigned by the final distribution: {distributed.json()['assigned']}"
        )

        await check_messages(db)
        await check_one_agent_each(db, agents)
        await check_loads(db)
    finally:
        for client in clients:
            await client.aclose()
        for process in processes:
            stop(process)
        await db.dispose()


async def count_pending(db: Database) -> int:
    async with db.read() as session:
        return int(
            await session.scalar(
                select(func.count()).select_from(Conversation).where(Conversation.status == PENDING)
            )
            or 0
        )


async def check_messages(db: Database) -> None:
    """0 lost: every inbound row ROUTED by the dispatcher and in exactly one thread, its customer's."""
    async with db.read() as session:
        by_state = {
            (status, handler): count
            for status, handler, count in (
                await session.execute(
                    select(InboundMessage.routing_status, InboundMessage.handler, func.count()).group_by(
                        InboundMessage.routing_status, InboundMessage.handler
                    )
                )
            ).all()
        }
        assert by_state == {(RoutingStatus.ROUTED.value, HANDLER): MESSAGES}, by_state
        thread_in = await session.scalar(
            select(func.count())
            .select_from(ConversationMessage)
            .where(ConversationMessage.direction == Direction.IN.value)
        )
        linked = await session.scalar(
            select(func.count(func.distinct(ConversationMessage.inbound_message_id))).where(
                ConversationMessage.direction == Direction.IN.value
            )
        )
        unlinked = await session.scalar(
            select(func.count())
            .select_from(InboundMessage)
            .outerjoin(ConversationMessage, ConversationMessage.inbound_message_id == InboundMessage.id)
            .where(ConversationMessage.id.is_(None))
        )
        wrong_customer = await session.scalar(
            select(func.count())
            .select_from(ConversationMessage)
            .join(InboundMessage, InboundMessage.id == ConversationMessage.inbound_message_id)
            .join(Conversation, Conversation.id == ConversationMessage.conversation_id)
            .where(Conversation.customer_phone != InboundMessage.from_phone)
        )
        wrong_body = await session.scalar(
            select(func.count())
            .select_from(ConversationMessage)
            .join(InboundMessage, InboundMessage.id == ConversationMessage.inbound_message_id)
            .where(ConversationMessage.body != InboundMessage.text)
        )
    assert (thread_in, linked, unlinked) == (MESSAGES, MESSAGES, 0), (thread_in, linked, unlinked)
    assert (wrong_customer, wrong_body) == (0, 0)


async def check_one_agent_each(db: Database, agents: list[str]) -> None:
    """One open conversation per customer; the history never gives a conversation to a second agent
    without taking it from the first, never puts an agent above capacity, and ends where the rows are."""
    async with db.read() as session:
        conversations = (await session.execute(select(Conversation))).scalars().all()
        history = (
            await session.execute(
                select(Event.id, Event.topic, Event.type, Event.data)
                .where(
                    Event.topic.like("conversation:%"),
                    Event.type.in_(
                        (
                            "ConversationAssigned",
                            "ConversationReassigned",
                            "ConversationPending",
                            "ConversationClosed",
                        )
                    ),
                )
                .order_by(Event.id)
            )
        ).all()
    open_per_customer = Counter(c.customer_phone for c in conversations if c.status != "CLOSED")
    assert len(open_per_customer) == CUSTOMERS
    assert max(open_per_customer.values()) == 1, "a customer with two open conversations"
    assert {c.status for c in conversations} <= {ASSIGNED, PENDING}

    holder: dict[str, str | None] = {}
    load: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    problems: list[str] = []
    for _, topic, type_, data in history:
        conversation = topic.removeprefix("conversation:")
        current = holder.get(conversation)
        if type_ == "ConversationAssigned" and current is not None:
            problems.append(f"{conversation}: assigned to {data['agent_id']} while {current} holds it")
        if type_ == "ConversationReassigned" and data.get("previous_agent_id") != current:
            problems.append(
                f"{conversation}: reassigned from {data.get('previous_agent_id')}, held by {current}"
            )
        if type_ == "ConversationPending" and current is not None:
            problems.append(f"{conversation}: pending while {current} holds it")
        if type_ in ("ConversationAssigned", "ConversationReassigned", "ConversationClosed"):
            new = data.get("agent_id") if type_ != "ConversationClosed" else None
            if current is not None:
                load[current] -= 1
            if new is not None:
                load[new] += 1
                peak[new] = max(peak[new], load[new])
            holder[conversation] = new
    assert problems == [], problems[:10]
    assert max(peak.values(), default=0) <= CAPACITY, peak
    assert set(peak) <= set(agents)
    ends = {c.id: (c.agent_id if c.status == ASSIGNED else None) for c in conversations}
    assert {conversation: holder.get(conversation) for conversation in ends} == ends


async def check_loads(db: Database) -> None:
    """Capacity and load agree with the rows; nothing pending while an ONLINE agent has room."""
    async with db.read() as session:
        agents = {a.id: a for a in (await session.execute(select(Agent))).scalars().all()}
        assigned = Counter(
            (
                await session.scalars(select(Conversation.agent_id).where(Conversation.status == ASSIGNED))
            ).all()
        )
        pending_ids = set(
            (await session.scalars(select(Conversation.id).where(Conversation.status == PENDING))).all()
        )
        held_for = set((await session.scalars(select(PendingMessage.conversation_id))).all())
    for agent in agents.values():
        assert agent.open_conversations == assigned.get(agent.id, 0), (agent.id, agent.open_conversations)
        assert agent.open_conversations <= agent.capacity
        assert agent.presence == Presence.ONLINE.value
    assert None not in assigned
    assert held_for == pending_ids, "held messages and PENDING conversations disagree"
    room = [a.id for a in agents.values() if a.open_conversations < a.capacity]
    assert not (pending_ids and room), f"{len(pending_ids)} PENDING while {room} have room"
