"""The dispatcher as a hypothesis state machine (issue 8, "Proof"), on SQLite and PostgreSQL.

Rules: connect, disconnect, go away, heartbeat, heartbeat lapse (the clock past the presence timeout,
the other agents beating), a customer message (through the inbound inbox, from a small pool of
customers), an agent's reply, a close, a reply timeout, a 24 h lapse, a distribution, and a burst of
several of these run concurrently (``asyncio.gather``).

Every rule ends with ``services.sweeper.run_once()``. After every step, read by SQL:

* every non-closed conversation is ASSIGNED to an agent ONLINE or AWAY, or PENDING with no agent and at
  least one held message (a rule that runs nothing concurrently must hold this before the sweep too; a
  burst may leave a conversation on an agent gone OFFLINE until the sweep);
* no agent above capacity, and its ``open_conversations`` is the count of its ASSIGNED conversations;
* every inbound message stored is routed, and carried by exactly one conversation message;
* at most one non-closed conversation per customer;
* one pending notice per conversation that was ever pending, none for the others;
* after a distribution (and after the sweep, whose ``pending_distribution`` deadline distributes), no
  PENDING conversation while an ONLINE agent of the rotation has room.

Each example gets a fresh database and its own event loop (as ``test_reservations_stateful.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from dispatchd.app import Services, build_services
from dispatchd.core.clock import ManualClock
from dispatchd.core.errors import Forbidden, InvalidState
from dispatchd.dispatcher.models import (
    Agent,
    Conversation,
    ConversationMessage,
    ConversationStatus,
    Direction,
    PendingMessage,
    Presence,
    QueuePosition,
)
from dispatchd.dispatcher.orchestrator import PENDING_NOTICE
from dispatchd.notifications import inbox
from dispatchd.notifications.inbox import ROUTING_POLICY, Received
from dispatchd.notifications.models import InboundMessage, Notification, RoutingStatus
from tests.conftest import make_settings, reset_postgres

EXAMPLES = {"sqlite": 12, "postgres": 10}
STEPS = 25
CUSTOMERS = 5
PRESENCE_TIMEOUT_S = 900.0
REPLY_TIMEOUT_S = 600.0
IDLE_CLOSE_S = 86_400.0

ASSIGNED = ConversationStatus.ASSIGNED.value
PENDING = ConversationStatus.PENDING.value
CLOSED = ConversationStatus.CLOSED.value
ONLINE, AWAY, OFFLINE = Presence.ONLINE.value, Presence.AWAY.value, Presence.OFFLINE.value

agent_index = st.integers(0, 2)
customer_index = st.integers(0, CUSTOMERS - 1)
pick = st.integers(0, 50)  # modulo what exists when the rule runs
burst_ops = st.lists(
    st.one_of(
        st.tuples(st.just("message"), customer_index),
        st.tuples(st.sampled_from(["connect", "disconnect", "away"]), agent_index),
        st.tuples(st.sampled_from(["close", "reply"]), pick),
        st.just(("distribute",)),
    ),
    min_size=2,
    max_size=5,
)


def customer_phone(index: int) -> str:
    return f"+22177{index:07d}"


class DispatcherMachine(RuleBasedStateMachine):
    """One example: a fresh database (``database`` is set on the class by the test) and event loop."""

    database: Callable[[], tuple[str, Callable[[], Awaitable[None]]]]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        url, prepare = type(self).database()
        self.loop.run_until_complete(prepare())
        self.clock = ManualClock()
        self.services: Services = build_services(
            make_settings(
                url,
                agent_presence_timeout_s=PRESENCE_TIMEOUT_S,
                agent_reply_timeout_s=REPLY_TIMEOUT_S,
                conversation_idle_close_s=IDLE_CLOSE_S,
            ),
            self.clock,
        )
        self.agents: list[str] = []
        self.wamids = itertools.count(1)
        self.texts = itertools.count(1)
        self.distributed = False  # the step ran a distribution: nothing pending while there is room
        self.concurrent = False  # the step ran operations concurrently: orphans allowed until the sweep

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.services.db.dispose())
        finally:
            self.loop.close()

    def run(self, coroutine: Awaitable):
        return self.loop.run_until_complete(coroutine)

    # ------------------------------------------------------------------------------- operations

    async def _message(self, customer: int) -> None:
        message = Received(
            wamid=f"wamid.machine-{next(self.wamids)}",
            from_phone=customer_phone(customer),
            type="text",
            text=f"message {next(self.texts)}",
            button_id=None,
            context_message_id=None,
            sent_at=None,
            raw={},
        )
        async with self.services.db.transaction() as session:
            stored, _ = await inbox.store(session, [message])
        await self.services.inbox.route(self.services.db, stored)

    async def _open_conversations(self) -> list[Conversation]:
        async with self.services.db.read() as session:
            rows = await session.scalars(
                select(Conversation)
                .where(Conversation.status != CLOSED)
                .order_by(Conversation.customer_phone, Conversation.opened_at)
            )
            return list(rows.all())

    async def _reply(self, index: int) -> str:
        open_rows = await self._open_conversations()
        if not open_rows:
            return "skip"
        row = open_rows[index % len(open_rows)]
        try:  # its agent when assigned; staff (None) when pending
            await self.services.dispatcher.reply(row.id, row.agent_id, "Bonjour, je m'en occupe")
        except (InvalidState, Forbidden) as exc:  # closed or handed on meanwhile (a burst)
            return type(exc).__name__
        return "ok"

    async def _close(self, index: int) -> str:
        open_rows = await self._open_conversations()
        if not open_rows:
            return "skip"
        await self.services.dispatcher.close(open_rows[index % len(open_rows)].id, "done")
        return "ok"

    async def _presence(self, agent: int, presence: Presence) -> str:
        await self.services.dispatcher.set_presence(self.agents[agent], presence)
        return "ok"

    async def _heartbeat_all(self, except_agent: str | None = None) -> None:
        for agent in await self.services.dispatcher.list_agents():
            if agent.presence != OFFLINE and agent.id != except_agent:
                await self.services.dispatcher.heartbeat(agent.id)

    async def _operation(self, op: tuple) -> str:
        kind = op[0]
        if kind == "message":
            await self._message(op[1])
            return "ok"
        if kind == "connect":
            return await self._presence(op[1], Presence.ONLINE)
        if kind == "disconnect":
            return await self._presence(op[1], Presence.OFFLINE)
        if kind == "away":
            return await self._presence(op[1], Presence.AWAY)
        if kind == "close":
            return await self._close(op[1])
        if kind == "reply":
            return await self._reply(op[1])
        if kind == "distribute":
            await self.services.dispatcher.distribute()
            return "ok"
        raise AssertionError(f"unknown operation {op!r}")  # pragma: no cover

    async def _sweep(self) -> dict[str, int]:
        """One sweeper tick; a routing that failed (a deadlock in a burst) is retried after its backoff."""
        handled = await self.services.sweeper.run_once()
        for _ in range(ROUTING_POLICY.max_attempts):
            async with self.services.db.read() as session:
                waiting = await session.scalar(
                    select(func.count())
                    .select_from(InboundMessage)
                    .where(InboundMessage.routing_status == RoutingStatus.PENDING.value)
                )
            if not waiting:
                break
            note(f"{waiting} inbound message(s) wait for a routing retry")
            await self._heartbeat_all()
            self.clock.advance(ROUTING_POLICY.cap_s)
            handled = await self.services.sweeper.run_once()
        return {name: count for name, count in handled.items() if count}

    def finish(self, label: str, *, distributed: bool = False) -> None:
        """Check before the sweep (strictly, unless operations ran concurrently; ``distributed``: the
        rule's last operation was a distribution), sweep, then the invariants run (``@invariant``)."""
        self.run(
            self.check(f"{label}, before the sweep", concurrent=self.concurrent, distributed=distributed)
        )
        note(f"{label}: sweep {self.run(self._sweep())}")
        # the sweeper's pending_distribution deadline distributes whenever pending and room coexist
        self.distributed = any(d.name == "pending_distribution" for d in self.services.sweeper.deadlines)

    # ------------------------------------------------------------------------------------ rules

    @initialize(
        capacities=st.lists(st.integers(1, 3), min_size=3, max_size=3),
        presences=st.lists(st.sampled_from([ONLINE, ONLINE, AWAY, OFFLINE]), min_size=3, max_size=3),
        customers=st.lists(customer_index, max_size=4),
    )
    def start(self, capacities: list[int], presences: list[str], customers: list[int]) -> None:
        """Three agents (capacities 1 to 3, mostly ONLINE), and a few customers who already wrote."""

        async def create() -> list[str]:
            agents = []
            for k, capacity in enumerate(capacities):
                agent = await self.services.dispatcher.create_agent(
                    {"name": f"Agent {k}", "phone": f"+22176{k:07d}", "capacity": capacity}
                )
                agents.append(agent.id)
            return agents

        self.agents = self.run(create())
        for k, presence in enumerate(presences):
            if presence != OFFLINE:
                self.run(self._presence(k, Presence.ONLINE))
            if presence == AWAY:
                self.run(self._presence(k, Presence.AWAY))
        for customer in customers:
            self.run(self._message(customer))
        note(f"agents {self.agents} capacities {capacities} presences {presences} customers {customers}")

    @rule(agent=agent_index)
    def connect(self, agent: int) -> None:
        self.concurrent = False
        self.run(self._presence(agent, Presence.ONLINE))
        self.finish(f"connect {agent}", distributed=True)

    @rule(agent=agent_index)
    def disconnect(self, agent: int) -> None:
        self.concurrent = False
        self.run(self._presence(agent, Presence.OFFLINE))
        self.finish(f"disconnect {agent}")

    @rule(agent=agent_index)
    def go_away(self, agent: int) -> None:
        self.concurrent = False
        self.run(self._presence(agent, Presence.AWAY))
        self.finish(f"away {agent}")

    @rule(agent=agent_index)
    def heartbeat_lapse(self, agent: int) -> None:
        """The clock passes the presence timeout; every other present agent keeps beating."""
        self.concurrent = False
        target = self.agents[agent]

        async def lapse() -> None:
            for _ in range(2):
                await self._heartbeat_all(except_agent=target)
                self.clock.advance(PRESENCE_TIMEOUT_S * 0.6)

        self.run(lapse())
        self.finish(f"heartbeat lapse of {agent}")
        presence = self.run(self.services.dispatcher.get_agent(target)).presence
        assert presence == OFFLINE, f"agent {agent} silent past the presence timeout is {presence}"

    @rule(customer=customer_index)
    def customer_message(self, customer: int) -> None:
        self.concurrent = False
        self.run(self._message(customer))
        self.finish(f"message from {customer}")

    @rule(index=pick)
    def agent_reply(self, index: int) -> None:
        self.concurrent = False
        outcome = self.run(self._reply(index))
        assert outcome in ("ok", "skip"), outcome
        self.finish(f"reply {index}: {outcome}")

    @rule(index=pick)
    def close(self, index: int) -> None:
        self.concurrent = False
        self.run(self._close(index))
        self.finish(f"close {index}")

    @rule()
    def reply_timeout(self) -> None:
        """The clock passes the reply timeout (agents keep beating)."""
        self.concurrent = False

        async def wait() -> None:
            await self._heartbeat_all()
            self.clock.advance(REPLY_TIMEOUT_S + 1)

        self.run(wait())
        self.finish("reply timeout")

    @rule()
    def idle_lapse(self) -> None:
        """24 h without a word: every agent's heartbeat lapses too, every conversation closes."""
        self.concurrent = False
        self.clock.advance(IDLE_CLOSE_S + 1)
        self.finish("24 h lapse")
        open_rows = self.run(self._open_conversations())
        assert open_rows == [], f"still open after 24 h idle: {[(c.id, c.status) for c in open_rows]}"

    @rule()
    def distribute(self) -> None:
        self.concurrent = False
        self.run(self.services.dispatcher.distribute())
        self.finish("distribute", distributed=True)

    @precondition(lambda self: bool(self.agents))
    @rule(ops=burst_ops)
    def burst(self, ops: list[tuple]) -> None:
        """Several operations at once (two customers' messages, a connect and a disconnect…)."""
        self.concurrent = True

        async def together() -> list[str]:
            return await asyncio.gather(*(self._operation(op) for op in ops))

        outcomes = self.run(together())
        self.finish(f"burst {list(zip(ops, outcomes, strict=True))}")

    # ------------------------------------------------------------------------------- invariants

    @invariant()
    def invariants_hold(self) -> None:
        if not self.agents:
            return
        self.run(self.check("the sweep", concurrent=False, distributed=self.distributed))
        self.distributed = False

    async def check(self, after: str, *, concurrent: bool, distributed: bool = False) -> None:
        """``concurrent``: operations ran at once and the sweeper has not run yet, so a conversation may
        still sit on an agent gone OFFLINE (the orphans deadline hands it on), and a routing that met a
        deadlock may wait for its retry."""
        async with self.services.db.read() as session:
            agents = {a.id: a for a in (await session.scalars(select(Agent))).all()}
            in_rotation = set((await session.scalars(select(QueuePosition.agent_id))).all())
            conversations = list((await session.scalars(select(Conversation))).all())
            held = Counter((await session.scalars(select(PendingMessage.conversation_id))).all())
            inbound_rows = list((await session.scalars(select(InboundMessage))).all())
            carried = Counter(
                (
                    await session.scalars(
                        select(ConversationMessage.inbound_message_id).where(
                            ConversationMessage.direction == Direction.IN.value
                        )
                    )
                ).all()
            )
            notices = Counter(
                (
                    await session.scalars(
                        select(Notification.subject).where(Notification.category == PENDING_NOTICE)
                    )
                ).all()
            )
        where = f"after {after}"
        open_rows = [c for c in conversations if c.status != CLOSED]
        assigned = Counter(c.agent_id for c in open_rows if c.status == ASSIGNED)
        for row in open_rows:
            state = f"{row.id} {row.customer_phone} {row.status} agent={row.agent_id}"
            if row.status == ASSIGNED:
                presence = agents[row.agent_id].presence
                assert presence in (ONLINE, AWAY) or (concurrent and presence == OFFLINE), (
                    f"{where}: {state} is assigned to an agent {presence}"
                )
                assert held[row.id] == 0, f"{where}: {state} has {held[row.id]} held message(s)"
            else:
                assert row.status == PENDING and row.agent_id is None, f"{where}: {state}"
                assert held[row.id] >= 1, f"{where}: {state} holds no message: no distribution finds it"
        for row in conversations:
            if row.status == CLOSED:
                assert held[row.id] == 0, f"{where}: closed {row.id} still holds messages"
            expected = 1 if row.pending_notice_sent else 0
            assert notices[f"conversation:{row.id}"] == expected, (
                f"{where}: {notices[f'conversation:{row.id}']} pending notice(s) for {row.id} "
                f"(pending_notice_sent={row.pending_notice_sent})"
            )
        for agent_id, agent in agents.items():
            assert 0 <= agent.open_conversations <= agent.capacity, (
                f"{where}: agent {self.agents.index(agent_id)} holds {agent.open_conversations} "
                f"> capacity {agent.capacity}"
            )
            assert agent.open_conversations == assigned.get(agent_id, 0), (
                f"{where}: agent {self.agents.index(agent_id)} open_conversations="
                f"{agent.open_conversations} but {assigned.get(agent_id, 0)} ASSIGNED"
            )
            assert (agent_id in in_rotation) == (agent.presence == ONLINE), (
                f"{where}: agent {self.agents.index(agent_id)} {agent.presence}, in rotation: "
                f"{agent_id in in_rotation}"
            )
        per_customer = Counter(c.customer_phone for c in open_rows)
        assert max(per_customer.values(), default=0) <= 1, f"{where}: {per_customer.most_common(2)}"
        for message in inbound_rows:
            if message.routing_status == RoutingStatus.ROUTED.value:
                assert carried[message.id] == 1, (
                    f"{where}: inbound {message.id} carried by {carried[message.id]} conversation messages"
                )
            else:
                assert concurrent and message.routing_status == RoutingStatus.PENDING.value, (
                    f"{where}: inbound {message.id} is {message.routing_status} ({message.last_error})"
                )
                assert carried[message.id] == 0
        assert set(carried) <= {m.id for m in inbound_rows}
        if distributed:
            waiting = sum(1 for c in open_rows if c.status == PENDING)
            room = [
                self.agents.index(a.id)
                for a in agents.values()
                if a.presence == ONLINE and a.id in in_rotation and a.open_conversations < a.capacity
            ]
            assert not (waiting and room), (
                f"{where}: {waiting} conversation(s) PENDING while agent(s) {room} are ONLINE with room"
            )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_dispatcher_keeps_its_invariants(backend: str, request: pytest.FixtureRequest, tmp_path: Path):
    examples = itertools.count()
    if backend == "sqlite":
        template = request.getfixturevalue("sqlite_template")

        def fresh_database() -> tuple[str, Callable[[], Awaitable[None]]]:
            target = tmp_path / f"example-{next(examples)}.db"
            shutil.copy(template, target)

            async def nothing() -> None:
                return None

            return f"sqlite+aiosqlite:///{target}", nothing

    else:
        postgres_url = request.getfixturevalue("postgres_url")  # skips, or fails in CI, when unreachable

        def fresh_database() -> tuple[str, Callable[[], Awaitable[None]]]:
            return postgres_url, lambda: reset_postgres(postgres_url)

    machine = type(
        f"DispatcherMachine_{backend}", (DispatcherMachine,), {"database": staticmethod(fresh_database)}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES[backend],
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
