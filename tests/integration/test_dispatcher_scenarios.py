"""The conversation dispatcher's scenarios (seed 001 §5, issue 8 "Proof"), one test each, on SQLite and
PostgreSQL: assign to a free agent, reassign on disconnect, hold when nobody is online, redistribute on
connect, the 24 h close, the scheduled distribution, a heartbeat lapse, a reply timeout, several
instances, and fairness over 1,000 conversations.

Customer messages go through the inbound inbox (stored as the webhook stores them, then routed), time
moves only with ``clock.advance``, deadlines run with ``services.sweeper.run_once()``.

The last tests reproduce defects this file found in the dispatcher core, now fixed: the rotation read
with SKIP LOCKED (a taker skipping a locked head concluded nobody had room, and concurrent takers moved
agents to equal positions), and a thread shuffled when its messages were written in one instant.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from dispatchd.app import Services, build_services
from dispatchd.core import events
from dispatchd.core.errors import InvalidState
from dispatchd.dispatcher.models import (
    Agent,
    Conversation,
    ConversationMessage,
    ConversationStatus,
    Direction,
    PendingMessage,
    Presence,
    QueuePosition,
    ScheduledRun,
)
from dispatchd.dispatcher.orchestrator import AGENT_REPLY, PENDING_NOTICE
from dispatchd.notifications import inbox
from dispatchd.notifications.inbox import Received
from dispatchd.notifications.models import InboundMessage, Notification, RoutingStatus
from tests.conftest import make_settings, new_phone

ASSIGNED = ConversationStatus.ASSIGNED.value
PENDING = ConversationStatus.PENDING.value
CLOSED = ConversationStatus.CLOSED.value
_wamids = itertools.count(1)
#: long enough that no heartbeat lapses in the tests that move time for another reason
NEVER_S = 10 * 86_400.0
REASSIGNED_METRIC = "dispatchd_conversations_reassigned_total"


# ------------------------------------------------------------------------------------------- helpers


async def new_agent(services: Services, capacity: int = 10, name: str = "Agent") -> str:
    agent = await services.dispatcher.create_agent({"name": name, "phone": new_phone(), "capacity": capacity})
    return agent.id


async def connect(services: Services, *agent_ids: str) -> None:
    for agent_id in agent_ids:
        await services.dispatcher.set_presence(agent_id, Presence.ONLINE)


async def write(services: Services, phone: str, text: str = "Bonjour") -> str:
    """The customer writes: stored as the webhook stores it, then routed inline. Returns the inbox id."""
    message = Received(
        wamid=f"wamid.dispatcher-{next(_wamids)}",
        from_phone=phone,
        type="text",
        text=text,
        button_id=None,
        context_message_id=None,
        sent_at=None,
        raw={},
    )
    async with services.db.transaction() as session:
        [stored], _ = await inbox.store(session, [message])
    await services.inbox.route(services.db, [stored])
    return stored


async def open_conversation(services: Services, phone: str) -> Conversation | None:
    async with services.db.read() as session:
        return await session.scalar(
            select(Conversation).where(Conversation.customer_phone == phone, Conversation.status != CLOSED)
        )


async def conversation(services: Services, conversation_id: str) -> Conversation:
    return await services.dispatcher.get_conversation(conversation_id)


async def agent(services: Services, agent_id: str) -> Agent:
    return await services.dispatcher.get_agent(agent_id)


async def loads(services: Services) -> dict[str, int]:
    return {a.id: a.open_conversations for a in await services.dispatcher.list_agents()}


async def outbox_to(services: Services, phone: str, category: str) -> list[Notification]:
    async with services.db.read() as session:
        rows = await session.scalars(
            select(Notification)
            .where(Notification.recipient == phone, Notification.category == category)
            .order_by(Notification.created_at, Notification.id)
        )
        return list(rows.all())


async def event_types(services: Services, topic: str) -> list[str]:
    async with services.db.read() as session:
        return [e.type for e in await events.read(session, topics=[topic], limit=1000)]


async def event_data(services: Services, topic: str, type_: str) -> list[dict]:
    async with services.db.read() as session:
        return [e.data for e in await events.read(session, topics=[topic], limit=1000) if e.type == type_]


async def held(services: Services, conversation_id: str) -> int:
    async with services.db.read() as session:
        return await session.scalar(
            select(func.count())
            .select_from(PendingMessage)
            .where(PendingMessage.conversation_id == conversation_id)
        )


async def check_invariants(services: Services) -> None:
    """What must hold after any scenario once the sweeper has run (the state machine checks the same)."""
    async with services.db.read() as session:
        agents = {a.id: a for a in (await session.scalars(select(Agent))).all()}
        open_rows = (await session.scalars(select(Conversation).where(Conversation.status != CLOSED))).all()
        per_customer = Counter(c.customer_phone for c in open_rows)
        inbound_ids = set((await session.scalars(select(InboundMessage.id))).all())
        carried = Counter(
            (
                await session.scalars(
                    select(ConversationMessage.inbound_message_id).where(
                        ConversationMessage.inbound_message_id.is_not(None)
                    )
                )
            ).all()
        )
        held_ids = set((await session.scalars(select(PendingMessage.conversation_id))).all())
    assigned = Counter(c.agent_id for c in open_rows if c.status == ASSIGNED)
    for row in open_rows:
        if row.status == ASSIGNED:
            assert row.agent_id in agents, row
            assert agents[row.agent_id].presence != Presence.OFFLINE.value, (
                f"{row.id} is ASSIGNED to OFFLINE agent {row.agent_id}"
            )
        else:
            assert row.status == PENDING and row.agent_id is None, row
            assert row.id in held_ids, f"PENDING {row.id} holds no message"
    for agent_id, row in agents.items():
        assert 0 <= row.open_conversations <= row.capacity, (agent_id, row.open_conversations, row.capacity)
        assert row.open_conversations == assigned.get(agent_id, 0), (
            f"{agent_id}: open_conversations={row.open_conversations}, assigned={assigned.get(agent_id, 0)}"
        )
    assert max(per_customer.values(), default=0) <= 1, per_customer.most_common(3)
    assert set(carried) <= inbound_ids and max(carried.values(), default=0) <= 1
    assert held_ids <= {c.id for c in open_rows if c.status == PENDING}, "messages held for a non-pending"


async def check_nothing_pending_with_room(services: Services) -> None:
    async with services.db.read() as session:
        waiting = await session.scalar(
            select(func.count()).select_from(Conversation).where(Conversation.status == PENDING)
        )
        room = await session.scalar(
            select(func.count())
            .select_from(Agent)
            .where(Agent.presence == Presence.ONLINE.value, Agent.open_conversations < Agent.capacity)
        )
    assert not (waiting and room), f"{waiting} conversation(s) PENDING while {room} ONLINE agent(s) have room"


# ---------------------------------------------------------------------------------------- scenarios


async def test_assign_to_a_free_agent(services: Services, clock):
    """§5.1: a new conversation goes to the head of the rotation; the customer's next message stays with
    that agent; the next customer goes to the next agent; a full agent is skipped."""
    first = await new_agent(services, capacity=1, name="Aminata")
    second = await new_agent(services, capacity=5, name="Babacar")
    await connect(services, first, second)
    assert await services.dispatcher.positions() == [first, second]

    customer = new_phone()
    inbound_id = await write(services, customer, "Bonjour, une question")
    talk = await open_conversation(services, customer)
    assert (talk.status, talk.agent_id, talk.reassignments) == (ASSIGNED, first, 0)
    async with services.db.read() as session:
        routed = await session.get(InboundMessage, inbound_id)
    assert (routed.routing_status, routed.handler, routed.outcome) == (
        RoutingStatus.ROUTED.value,
        "dispatcher.customer_message",
        ASSIGNED,
    )
    assert await event_types(services, f"conversation:{talk.id}") == [
        "ConversationOpened",
        "MessageReceived",
        "ConversationAssigned",
    ]
    [assigned] = await event_data(services, f"agent:{first}", "ConversationAssigned")
    assert assigned["conversation_id"] == talk.id and assigned["decision"] == "ASSIGN_NEW_AGENT"
    assert await services.dispatcher.positions() == [second, first]  # moved to the end

    clock.advance(1)
    await write(services, customer, "Vous êtes là ?")  # the same conversation, kept by its agent
    again = await open_conversation(services, customer)
    assert (again.id, again.agent_id) == (talk.id, first)
    assert (await loads(services))[first] == 1

    other = new_phone()
    await write(services, other)  # round-robin: the next agent
    assert (await open_conversation(services, other)).agent_id == second
    third = new_phone()
    await write(services, third)  # the first agent is full (capacity 1): skipped
    assert (await open_conversation(services, third)).agent_id == second
    assert await loads(services) == {first: 1, second: 2}

    clock.advance(1)
    reply = await services.dispatcher.reply(talk.id, first, "Bonjour, je vous écoute")
    [sent] = await outbox_to(services, customer, AGENT_REPLY)
    assert (sent.id, sent.body) == (reply.notification_id, "Bonjour, je vous écoute")
    thread = await services.dispatcher.thread(talk.id)
    assert [(m.direction, m.body) for m in thread] == [
        (Direction.IN.value, "Bonjour, une question"),
        (Direction.IN.value, "Vous êtes là ?"),
        (Direction.OUT.value, "Bonjour, je vous écoute"),
    ]
    assert await outbox_to(services, customer, PENDING_NOTICE) == []
    await check_invariants(services)


async def test_reassign_on_disconnect(services: Services):
    """§5.2: a disconnecting agent's conversations go to the next agent, or pending when nobody can take
    them: each one exactly one of the two."""
    leaving = await new_agent(services, name="Leaving")
    staying = await new_agent(services, capacity=3, name="Staying")
    await connect(services, leaving, staying)
    customers = [new_phone() for _ in range(4)]
    for phone in customers:
        await write(services, phone)
    before = {p: (await open_conversation(services, p)) for p in customers}
    assert [before[p].agent_id for p in customers] == [leaving, staying, leaving, staying]

    moved = await services.dispatcher.set_presence(leaving, Presence.OFFLINE)
    assert moved.presence == Presence.OFFLINE.value and moved.open_conversations == 0
    assert leaving not in await services.dispatcher.positions()
    after = {p: await conversation(services, before[p].id) for p in customers}
    # the staying agent had room for one more: one of the leaving agent's went to it, one is pending
    of_leaving = [p for p in customers if before[p].agent_id == leaving]
    assert sorted(after[p].status for p in of_leaving) == [ASSIGNED, PENDING]
    for phone in customers:
        row = after[phone]
        if phone in of_leaving:
            assert row.reassignments == 1
            reasons = await event_data(services, f"conversation:{row.id}", "ConversationReassigned")
            assert [(r["reason"], r["previous_agent_id"]) for r in reasons] == [
                ("agent disconnected", leaving)
            ]
        else:
            assert (row.agent_id, row.reassignments) == (staying, 0)
        if row.status == PENDING:  # never both, never neither
            assert row.agent_id is None and await held(services, row.id) == 1
            assert len(await outbox_to(services, phone, PENDING_NOTICE)) == 1
        else:
            assert (row.status, row.agent_id) == (ASSIGNED, staying) and await held(services, row.id) == 0
            assert await outbox_to(services, phone, PENDING_NOTICE) == []
    assert await loads(services) == {leaving: 0, staying: 3}
    await check_invariants(services)

    await services.dispatcher.set_presence(staying, Presence.OFFLINE)  # nobody left: all pending
    for phone in customers:
        row = await open_conversation(services, phone)
        assert (row.status, row.agent_id) == (PENDING, None)
        assert len(await outbox_to(services, phone, PENDING_NOTICE)) == 1, "one notice per conversation"
    assert await loads(services) == {leaving: 0, staying: 0}
    await check_invariants(services)


async def test_hold_when_nobody_is_online(services: Services, settings, clock):
    """§5.3: nobody ONLINE (an AWAY agent takes no new conversation): the conversation is PENDING, each
    message held, and the customer gets exactly one "we will answer you shortly" per conversation."""
    away = await new_agent(services, name="Away")
    await connect(services, away)
    await services.dispatcher.set_presence(away, Presence.AWAY)
    await new_agent(services, name="Offline")

    first, second = new_phone(), new_phone()
    for text in ("Bonjour", "Il y a quelqu'un ?", "Allô"):
        await write(services, first, text)
        clock.advance(1)
    await write(services, second)

    waiting = await open_conversation(services, first)
    assert (waiting.status, waiting.agent_id, waiting.pending_notice_sent) == (PENDING, None, True)
    assert await held(services, waiting.id) == 3
    [notice] = await outbox_to(services, first, PENDING_NOTICE)
    assert notice.body == settings.pending_notice and notice.subject == f"conversation:{waiting.id}"
    assert len(await outbox_to(services, second, PENDING_NOTICE)) == 1
    assert (await open_conversation(services, second)).status == PENDING
    assert set((await loads(services)).values()) == {0}
    assert "ConversationPending" in await event_types(services, f"conversation:{waiting.id}")
    assert (await services.sweeper.run_once())["agent_presence"] == 0
    await check_invariants(services)

    # held messages are not lost: the first to connect gets them, in the thread, in order
    await connect(services, away)
    taken = await conversation(services, waiting.id)
    assert (taken.status, taken.agent_id) == (ASSIGNED, away)
    assert [m.body for m in await services.dispatcher.thread(waiting.id)] == [
        "Bonjour",
        "Il y a quelqu'un ?",
        "Allô",
    ]
    assert await held(services, waiting.id) == 0
    assert len(await outbox_to(services, first, PENDING_NOTICE)) == 1
    await check_invariants(services)


async def test_redistribute_on_connect(services: Services, clock):
    """§5.4: an agent connecting takes the pending conversations oldest first, up to its capacity; the
    next one to connect takes the rest."""
    customers = [new_phone() for _ in range(5)]
    for phone in reversed(customers):  # the last customer wrote first
        await write(services, phone)
        clock.advance(1)
    await write(services, customers[-1], "encore")  # a later message does not make it younger
    ids = {p: (await open_conversation(services, p)).id for p in customers}
    oldest_first = list(reversed(customers))

    small = await new_agent(services, capacity=3, name="Small")
    await connect(services, small)
    statuses = [(await conversation(services, ids[p])).status for p in oldest_first]
    assert statuses == [ASSIGNED, ASSIGNED, ASSIGNED, PENDING, PENDING]
    assert {(await conversation(services, ids[p])).agent_id for p in oldest_first[:3]} == {small}
    assert await loads(services) == {small: 3}
    assert [await held(services, ids[p]) for p in oldest_first] == [0, 0, 0, 1, 1]

    big = await new_agent(services, capacity=10, name="Big")
    await connect(services, big)
    for phone in oldest_first[3:]:
        row = await conversation(services, ids[phone])
        assert (row.status, row.agent_id, row.pending_since) == (ASSIGNED, big, None)
        assert row.first_assigned_at == clock.now()
    assert await loads(services) == {small: 3, big: 2}
    for phone in customers:
        assert len(await outbox_to(services, phone, PENDING_NOTICE)) == 1
    await check_invariants(services)


async def test_24h_close_then_a_new_message_opens_a_new_conversation(db_url, clock):
    """§5.5: a conversation whose customer has not written for 24 h closes (not a second before; the
    customer's message restarts the 24 h, an agent's reply does not: WhatsApp's window runs from the
    customer), the agent has one fewer; the customer's next message opens a new conversation."""
    services = build_services(
        make_settings(db_url, agent_presence_timeout_s=NEVER_S, agent_reply_timeout_s=0), clock
    )
    try:
        day = services.settings.conversation_idle_close_s
        agent_id = await new_agent(services)
        await connect(services, agent_id)
        customer, quiet = new_phone(), new_phone()
        await write(services, customer)
        await write(services, quiet)
        talk = await open_conversation(services, customer)
        silent = await open_conversation(services, quiet)

        clock.advance(day / 2)
        await write(services, customer, "Vous êtes là ?")  # the customer's message restarts the 24 h
        await services.dispatcher.reply(silent.id, agent_id, "Je regarde")  # an agent's reply does not
        clock.advance(day / 2 - 1)
        assert (await services.sweeper.run_once())["conversation_idle_close"] == 0
        clock.advance(1)
        assert (await services.sweeper.run_once())["conversation_idle_close"] == 1
        closed = await conversation(services, silent.id)
        assert (closed.status, closed.close_reason, closed.closed_at) == (CLOSED, "idle", clock.now())
        assert (await conversation(services, talk.id)).status == ASSIGNED
        assert (await agent(services, agent_id)).open_conversations == 1
        assert "ConversationClosed" in await event_types(services, f"conversation:{silent.id}")

        clock.advance(day / 2)
        assert (await services.sweeper.run_once())["conversation_idle_close"] == 1
        assert (await conversation(services, talk.id)).status == CLOSED
        assert (await agent(services, agent_id)).open_conversations == 0

        await write(services, customer, "Re-bonjour")
        fresh = await open_conversation(services, customer)
        assert fresh.id != talk.id and fresh.opened_at == clock.now()
        assert (fresh.status, fresh.agent_id, fresh.reassignments) == (ASSIGNED, agent_id, 0)
        assert [m.body for m in await services.dispatcher.thread(fresh.id)] == ["Re-bonjour"]
        assert (await conversation(services, talk.id)).status == CLOSED
        await check_invariants(services)

        # a PENDING conversation closes too, and its held messages go with it
        await services.dispatcher.set_presence(agent_id, Presence.OFFLINE)
        assert (await conversation(services, fresh.id)).status == PENDING
        clock.advance(day)
        await services.sweeper.run_once()
        assert (await conversation(services, fresh.id)).status == CLOSED
        assert await held(services, fresh.id) == 0
        await check_invariants(services)
    finally:
        await services.db.dispose()


def scheduled_services(db_url: str, clock) -> Services:
    """Services with a schedule at 09:30 every day in Dakar (UTC+0 all year); 08:00 there now."""
    clock.set(datetime(2026, 1, 5, 8, 0, tzinfo=UTC))
    return build_services(
        make_settings(
            db_url,
            dispatch_schedule="30 9 * * *",
            timezone="Africa/Dakar",
            agent_presence_timeout_s=NEVER_S,
            agent_reply_timeout_s=0,
        ),
        clock,
    )


async def pending_with_room(services: Services, clock) -> tuple[str, str, str]:
    """An ONLINE agent of capacity 1 with room and two PENDING conversations (the older first): the room
    is freed by the orchestrator's close alone, which distributes nothing. Returns (agent, older, newer)."""
    agent_id = await new_agent(services, capacity=1)
    await connect(services, agent_id)
    busy, older, newer = new_phone(), new_phone(), new_phone()
    await write(services, busy)
    await write(services, older)
    clock.advance(1)
    await write(services, newer)
    assert [(await open_conversation(services, p)).status for p in (busy, older, newer)] == [
        ASSIGNED,
        PENDING,
        PENDING,
    ]
    orchestrator = services.domain("dispatcher").extras["orchestrator"]
    async with services.db.transaction() as session:
        row = await session.get(Conversation, (await open_conversation(services, busy)).id)
        await orchestrator.close(session, row, "done")
    assert (await agent(services, agent_id)).open_conversations == 0
    return agent_id, older, newer


async def test_scheduled_distribution_runs_at_the_cron_time_not_before(db_url, clock):
    """§5.6 / §6.4: at DISPATCHD_DISPATCH_SCHEDULE (cron, read in DISPATCHD_TIMEZONE) the pending
    conversations are distributed, oldest first, up to the room there is; not a second before; once per
    cron time.

    The ``pending_distribution`` deadline (which distributes at every tick whenever a pending conversation
    and an agent with room coexist) is left out of this sweeper: with it, the schedule never finds
    anything left to do (see the next test)."""
    services = scheduled_services(db_url, clock)
    services.sweeper.deadlines = [d for d in services.sweeper.deadlines if d.name != "pending_distribution"]
    try:
        assert (await services.sweeper.run_once())["scheduled_distribution"] == 0  # plans the first run
        async with services.db.read() as session:
            run = await session.get(ScheduledRun, "scheduled_distribution")
        assert run.next_run_at == datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
        agent_id, older, newer = await pending_with_room(services, clock)

        clock.set(datetime(2026, 1, 5, 9, 29, 59, tzinfo=UTC))
        assert (await services.sweeper.run_once())["scheduled_distribution"] == 0
        assert (await open_conversation(services, older)).status == PENDING

        clock.advance(1)  # 09:30 in Dakar
        assert (await services.sweeper.run_once())["scheduled_distribution"] == 1
        row = await open_conversation(services, older)
        assert (row.status, row.agent_id) == (ASSIGNED, agent_id)  # the oldest, up to capacity
        assert (await open_conversation(services, newer)).status == PENDING
        async with services.db.read() as session:
            run = await session.get(ScheduledRun, "scheduled_distribution", populate_existing=True)
        assert run.next_run_at == datetime(2026, 1, 6, 9, 30, tzinfo=UTC)

        await services.dispatcher.close(row.id, "done")  # the service's close distributes the room at once
        assert (await open_conversation(services, newer)).status == ASSIGNED
        assert (await services.sweeper.run_once())["scheduled_distribution"] == 0  # once per cron time
        await check_invariants(services)
    finally:
        await services.db.dispose()


async def test_with_the_full_sweeper_freed_room_is_distributed_at_the_next_tick(db_url, clock):
    """What the whole sweeper does with the same state: ``pending_distribution`` gives the room away at
    the next tick, hours before the schedule, which then has nothing to distribute."""
    services = scheduled_services(db_url, clock)
    try:
        await services.sweeper.run_once()
        agent_id, older, newer = await pending_with_room(services, clock)
        handled = await services.sweeper.run_once()
        assert (handled["pending_distribution"], handled["scheduled_distribution"]) == (1, 0)
        assert (await open_conversation(services, older)).agent_id == agent_id
        clock.set(datetime(2026, 1, 5, 9, 30, tzinfo=UTC))
        assert (await services.sweeper.run_once())["scheduled_distribution"] == 0
        await check_invariants(services)
    finally:
        await services.db.dispose()


async def test_heartbeat_lapse_disconnects_the_agent(services: Services, clock, settings):
    """An agent whose heartbeat is older than DISPATCHD_AGENT_PRESENCE_TIMEOUT_S is disconnected by the
    sweeper exactly as if it had said OFFLINE: its conversations move on."""
    timeout = settings.agent_presence_timeout_s
    alive = await new_agent(services, name="Alive")
    silent = await new_agent(services, name="Silent")
    away = await new_agent(services, name="Away")
    await connect(services, alive, silent, away)
    customers = [new_phone() for _ in range(3)]
    for phone in customers:
        await write(services, phone)
    [mine, theirs, held_by_away] = [await open_conversation(services, p) for p in customers]
    assert (mine.agent_id, theirs.agent_id, held_by_away.agent_id) == (alive, silent, away)
    await services.dispatcher.set_presence(away, Presence.AWAY)  # AWAY must keep beating too

    clock.advance(timeout - 30)
    await services.dispatcher.heartbeat(alive)
    clock.advance(29)
    assert (await services.sweeper.run_once())["agent_presence"] == 0
    clock.advance(1)  # exactly the timeout since the last heartbeat of Silent and Away
    assert (await services.sweeper.run_once())["agent_presence"] == 2
    assert {a.id: a.presence for a in await services.dispatcher.list_agents()} == {
        alive: Presence.ONLINE.value,
        silent: Presence.OFFLINE.value,
        away: Presence.OFFLINE.value,
    }
    assert await services.dispatcher.positions() == [alive]
    for row in (theirs, held_by_away):
        moved = await conversation(services, row.id)
        assert (moved.status, moved.agent_id, moved.reassignments) == (ASSIGNED, alive, 1)
        [reassigned] = await event_data(services, f"conversation:{row.id}", "ConversationReassigned")
        assert reassigned["reason"] == "heartbeat lapsed"
    [gone] = await event_data(services, f"agent:{silent}", "AgentDisconnected")
    assert gone["reason"] == "heartbeat lapsed"
    assert await loads(services) == {alive: 3, silent: 0, away: 0}
    with pytest.raises(InvalidState):
        await services.dispatcher.heartbeat(silent)  # must connect again
    await check_invariants(services)


async def test_no_agent_reply_reassigns_to_another_agent_and_counts_it(db_url, clock):
    """A customer waiting DISPATCHD_AGENT_REPLY_TIMEOUT_S for the agent's reply is handed to another
    agent, counted; an answered conversation stays; with nobody else, it is kept."""
    services = build_services(
        make_settings(db_url, agent_reply_timeout_s=600, agent_presence_timeout_s=NEVER_S), clock
    )
    try:
        slow = await new_agent(services, name="Slow")
        quick = await new_agent(services, name="Quick")
        await connect(services, slow, quick)
        waiting, answered = new_phone(), new_phone()
        await write(services, waiting)
        await write(services, answered)
        talk = await open_conversation(services, waiting)
        other = await open_conversation(services, answered)
        assert (talk.agent_id, other.agent_id) == (slow, quick)
        await services.dispatcher.reply(other.id, quick, "Bonjour !")

        counted = REGISTRY.get_sample_value(REASSIGNED_METRIC, {"reason": "no agent reply"}) or 0.0
        clock.advance(599)
        assert (await services.sweeper.run_once())["agent_reply_timeout"] == 0
        clock.advance(1)
        assert (await services.sweeper.run_once())["agent_reply_timeout"] == 1
        assert REGISTRY.get_sample_value(REASSIGNED_METRIC, {"reason": "no agent reply"}) == counted + 1
        moved = await conversation(services, talk.id)
        assert (moved.status, moved.agent_id, moved.reassignments) == (ASSIGNED, quick, 1)
        [reassigned] = await event_data(services, f"conversation:{talk.id}", "ConversationReassigned")
        assert (reassigned["reason"], reassigned["previous_agent_id"]) == ("no agent reply", slow)
        assert await loads(services) == {slow: 0, quick: 2}
        assert (await conversation(services, other.id)).agent_id == quick
        await check_invariants(services)
    finally:
        await services.db.dispose()


async def test_after_a_reply_timeout_the_new_agent_gets_a_full_timeout(db_url, clock):
    """Regression: the reassignment used to keep ``awaiting_reply_since``, so every later tick handed the
    conversation on again (ping-pong between agents, reassignments counted at every tick)."""
    services = build_services(
        make_settings(db_url, agent_reply_timeout_s=600, agent_presence_timeout_s=NEVER_S), clock
    )
    try:
        slow = await new_agent(services, name="Slow")
        quick = await new_agent(services, name="Quick")
        await connect(services, slow, quick)
        customer = new_phone()
        await write(services, customer)
        clock.advance(600)
        await services.sweeper.run_once()
        moved = await open_conversation(services, customer)
        assert (moved.agent_id, moved.reassignments) == (quick, 1)

        clock.advance(1)  # the next sweeper tick, 599 s before the new agent's own timeout
        await services.sweeper.run_once()
        still = await open_conversation(services, customer)
        assert (still.agent_id, still.reassignments) == (quick, 1), (
            f"handed on again one tick later: agent {still.agent_id}, reassignments {still.reassignments}"
        )
    finally:
        await services.db.dispose()


async def test_no_agent_reply_with_nobody_else_keeps_the_agent(db_url, clock):
    services = build_services(
        make_settings(db_url, agent_reply_timeout_s=600, agent_presence_timeout_s=NEVER_S), clock
    )
    try:
        only = await new_agent(services, name="Only")
        await connect(services, only)
        customer = new_phone()
        await write(services, customer)
        clock.advance(600)
        assert (await services.sweeper.run_once())["agent_reply_timeout"] == 1
        kept = await open_conversation(services, customer)
        assert (kept.agent_id, kept.awaiting_reply_since) == (only, clock.now())
        clock.advance(599)
        assert (await services.sweeper.run_once())["agent_reply_timeout"] == 0
        await check_invariants(services)
    finally:
        await services.db.dispose()


async def test_several_instances_never_double_assign_nor_overfill(services: Services, settings, clock):
    """§5.7: two instances on one database route messages and take connects / disconnects concurrently:
    no message lost or counted twice, no customer with two conversations, no agent above capacity."""
    other = build_services(settings, clock)
    instances = (services, other)
    try:
        agents = [await new_agent(services, capacity=3, name=f"A{k}") for k in range(6)]
        customers = [new_phone() for _ in range(40)]
        rng = random.Random(8)
        await asyncio.gather(*(connect(instances[k % 2], a) for k, a in enumerate(agents[:3])))

        jobs = []
        for round_ in range(3):
            for k, phone in enumerate(customers):
                jobs.append(write(instances[(k + round_) % 2], phone, f"message {round_}"))
        for k, agent_id in enumerate(agents):
            jobs.append(connect(instances[k % 2], agent_id))
        for agent_id in agents[:2]:
            jobs.append(instances[1].dispatcher.set_presence(agent_id, Presence.OFFLINE))
        jobs.append(instances[0].dispatcher.distribute())
        rng.shuffle(jobs)
        for start in range(0, len(jobs), 16):
            await asyncio.gather(*jobs[start : start + 16])
        await asyncio.gather(services.sweeper.run_once(), other.sweeper.run_once())

        async with services.db.read() as session:
            inbound_total = await session.scalar(select(func.count()).select_from(InboundMessage))
            statuses = Counter(
                (
                    await session.scalars(
                        select(InboundMessage.routing_status).where(InboundMessage.handler.is_not(None))
                    )
                ).all()
            )
            thread_in = await session.scalar(
                select(func.count())
                .select_from(ConversationMessage)
                .where(ConversationMessage.direction == Direction.IN.value)
            )
            opened = await session.scalar(select(func.count()).select_from(Conversation))
        assert inbound_total == thread_in == 3 * len(customers), "a message lost or counted twice"
        assert statuses == {RoutingStatus.ROUTED.value: 3 * len(customers)}
        assert opened == len(customers)
        await check_invariants(services)

        # every assignment event agrees with the row: the last one names the conversation's agent
        for phone in customers:
            row = await open_conversation(services, phone)
            async with services.db.read() as session:
                history = [
                    e
                    for e in await events.read(session, topics=[f"conversation:{row.id}"], limit=1000)
                    if e.type in ("ConversationAssigned", "ConversationReassigned", "ConversationPending")
                ]
            last_agent = None
            for event in history:
                last_agent = None if event.type == "ConversationPending" else event.data["agent_id"]
            assert last_agent == row.agent_id, (phone, row.status, row.agent_id, history)
        # then one distribution: nothing is left pending while an ONLINE agent has room
        await other.dispatcher.distribute()
        await check_invariants(services)
        await check_nothing_pending_with_room(services)
    finally:
        await other.db.dispose()


async def test_fairness_1000_conversations_over_10_equal_agents(services: Services):
    """10 agents of equal capacity, all ONLINE, 1,000 new conversations arriving 20 at a time: every one
    is assigned and the assignments per agent differ by at most 1."""
    agents = [await new_agent(services, capacity=150, name=f"Fair {k}") for k in range(10)]
    await connect(services, *agents)
    customers = [new_phone() for _ in range(1000)]
    for start in range(0, len(customers), 20):
        await asyncio.gather(
            *(services.dispatcher.message_in(p, "Bonjour") for p in customers[start : start + 20])
        )
    per_agent = sorted((await loads(services)).values())
    async with services.db.read() as session:
        statuses = Counter((await session.scalars(select(Conversation.status))).all())
    assert statuses == {ASSIGNED: 1000}, f"{dict(statuses)}; per agent {per_agent}"
    assert per_agent[-1] - per_agent[0] <= 1, per_agent
    await check_invariants(services)


async def test_a_thread_written_in_one_instant_keeps_its_order(services: Services):
    agent_id = await new_agent(services)
    await connect(services, agent_id)
    customer = new_phone()
    texts = [f"message {k}" for k in range(12)]  # 1/12! chance that random ids sort right by luck
    for text in texts:
        await write(services, customer, text)
    talk = await open_conversation(services, customer)
    assert [m.body for m in await services.dispatcher.thread(talk.id)] == texts


async def hold_the_rotation_head(services: Services, customer: str):
    """Start a transaction that takes the head of the rotation for ``customer`` and keeps it open (its
    rotation row locked, as during any concurrent arrival); returns (context manager, session)."""
    orchestrator = services.domain("dispatcher").extras["orchestrator"]
    transaction = services.db.transaction()
    session = await transaction.__aenter__()
    conversation = await orchestrator.message_arrived(session, customer, "first")
    assert conversation.status == ASSIGNED
    return transaction, session


@pytest.mark.parametrize("backend", ["postgres"])
async def test_an_arrival_during_another_is_not_held_while_the_agent_has_room(services: Services):
    """Minimal reproduction (PostgreSQL; SQLite serialises writers): one ONLINE agent with room for 10;
    while a first arrival's transaction is open, a second customer writes."""
    agent_id = await new_agent(services, capacity=10)
    await connect(services, agent_id)
    first, second = new_phone(), new_phone()
    transaction, _ = await hold_the_rotation_head(services, first)
    try:
        concurrent = asyncio.create_task(services.dispatcher.message_in(second, "second"))
        await asyncio.wait({concurrent}, timeout=0.5)  # it waits for the rotation, it does not skip it
    finally:
        await transaction.__aexit__(None, None, None)
    row = await concurrent
    assert (row.status, row.agent_id) == (ASSIGNED, agent_id), (
        f"PENDING with a pending notice while the only agent has {10 - 1} free places"
    )


@pytest.mark.parametrize("backend", ["postgres"])
async def test_two_concurrent_takers_leave_distinct_rotation_positions(services: Services):
    """Minimal reproduction (PostgreSQL): two agents; two arrivals in concurrent transactions take one
    agent each, and each moves its agent to ``max(position) + 1`` as its own snapshot sees it."""
    agents = [await new_agent(services, name=name) for name in ("A", "B")]
    await connect(services, *agents)
    transaction, _ = await hold_the_rotation_head(services, new_phone())  # takes A
    try:
        second = asyncio.create_task(services.dispatcher.message_in(new_phone(), "second"))
        await asyncio.wait({second}, timeout=0.5)  # waits for the rotation
    finally:
        await transaction.__aexit__(None, None, None)
    await second  # takes B, after A's move is committed
    async with services.db.read() as session:
        positions = (await session.execute(select(QueuePosition.agent_id, QueuePosition.position))).all()
    assert len({position for _, position in positions}) == 2, f"tied rotation positions: {positions}"
