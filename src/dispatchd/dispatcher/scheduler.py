"""The dispatcher's deadlines (seed 001 §4.7): columns of rows, claimed by the sweeper (``SKIP LOCKED``
on PostgreSQL), never timers. Nothing here assigns: each deadline calls the orchestrator.

* ``check_response_timeout``: a conversation whose customer has not written for
  ``DISPATCHD_CONVERSATION_IDLE_CLOSE_S`` (24 h: WhatsApp's customer-service window runs from the
  customer's last message) closes;
* ``pending_distribution``: pending conversations while an agent has room (a close or a capacity
  raise freed it) are distributed within a tick;
* ``scheduled_distribution``: at each time of ``DISPATCHD_DISPATCH_SCHEDULE`` (cron, in
  ``DISPATCHD_TIMEZONE``), ``distribute_pending``;
* ``agent_presence``: an agent whose heartbeat is older than ``DISPATCHD_AGENT_PRESENCE_TIMEOUT_S``
  (90 s) is disconnected, exactly as if it had said OFFLINE;
* ``orphaned_conversations``: a conversation whose agent is OFFLINE (left by a disconnect that met a
  concurrent transaction) goes to the next agent or pending;
* ``agent_reply_timeout``: a customer waiting ``DISPATCHD_AGENT_REPLY_TIMEOUT_S`` (600 s) for the
  agent's reply is handed to the next agent;
* ``pending_alert``: admins are alerted (1 h cooldown) when a conversation has waited
  ``DISPATCHD_PENDING_ALERT_S`` (10 min) for an agent.

Each deadline's "due" predicate is written once, for its claim and its lag report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core.db import Database, lock_for_update, retry_transient
from dispatchd.core.sweeper import Deadline
from dispatchd.dispatcher import queue
from dispatchd.dispatcher.models import (
    Agent,
    Conversation,
    ConversationStatus,
    Presence,
    QueuePosition,
    ScheduledRun,
)
from dispatchd.dispatcher.orchestrator import Orchestrator
from dispatchd.notifications import outbox
from dispatchd.notifications.alerts import ADMIN_ALERT
from dispatchd.notifications.models import AlertState
from dispatchd.notifications.outbox import Message

DISTRIBUTION = "scheduled_distribution"
PENDING_ALERT_RULE = "CONVERSATION_PENDING"
PENDING_ALERT_COOLDOWN = timedelta(hours=1)


@dataclass(frozen=True)
class SchedulerConfig:
    """Seconds, as the settings of the same names; ``schedule`` a cron expression or None."""

    idle_close_s: float = 86_400.0
    presence_timeout_s: float = 90.0
    reply_timeout_s: float = 600.0
    pending_alert_s: float = 600.0
    schedule: str | None = None
    timezone: str = "UTC"
    admin_phones: tuple[str, ...] = ()


def next_run(expression: str, timezone: str, after: datetime) -> datetime:
    """The first time of the cron ``expression`` (read in ``timezone``) strictly after ``after`` (UTC)."""
    zone = ZoneInfo(timezone)
    local = croniter(expression, after.astimezone(zone)).get_next(datetime)
    return local.astimezone(after.tzinfo)


class Scheduler:
    def __init__(self, orchestrator: Orchestrator, config: SchedulerConfig) -> None:
        self.orchestrator = orchestrator
        self.config = config

    # ---------------------------------------------------------------------------------- predicates

    def idle_due(self, now: datetime) -> ColumnElement[bool]:
        return (Conversation.status != ConversationStatus.CLOSED.value) & (
            Conversation.last_customer_message_at <= now - timedelta(seconds=self.config.idle_close_s)
        )

    def presence_due(self, now: datetime) -> ColumnElement[bool]:
        return (Agent.presence != Presence.OFFLINE.value) & (
            Agent.last_heartbeat_at <= now - timedelta(seconds=self.config.presence_timeout_s)
        )

    def reply_due(self, now: datetime) -> ColumnElement[bool]:
        return (Conversation.status == ConversationStatus.ASSIGNED.value) & (
            Conversation.awaiting_reply_since <= now - timedelta(seconds=self.config.reply_timeout_s)
        )

    @staticmethod
    def orphan_due(_now: datetime) -> ColumnElement[bool]:
        offline = select(Agent.id).where(Agent.presence == Presence.OFFLINE.value)
        return (Conversation.status == ConversationStatus.ASSIGNED.value) & Conversation.agent_id.in_(offline)

    @staticmethod
    def room_due(_now: datetime) -> ColumnElement[bool]:
        """Pending conversations while an agent of the rotation has room (a close, a capacity raise, a
        connect whose distribution did not run)."""
        room = (
            select(Agent.id)
            .join(QueuePosition, QueuePosition.agent_id == Agent.id)
            .where(Agent.presence == Presence.ONLINE.value, Agent.open_conversations < Agent.capacity)
            .exists()
        )
        return (Conversation.status == ConversationStatus.PENDING.value) & room

    def pending_alert_due(self, now: datetime) -> ColumnElement[bool]:
        return (Conversation.status == ConversationStatus.PENDING.value) & (
            Conversation.pending_since <= now - timedelta(seconds=self.config.pending_alert_s)
        )

    # ------------------------------------------------------------------------------------ handlers

    @retry_transient
    async def check_response_timeout(self, db: Database, limit: int) -> int:
        """Close the conversations idle for 24 h."""
        async with db.transaction() as session:
            rows = await self._claim(
                session, Conversation, self.idle_due, Conversation.last_customer_message_at, limit
            )
            for conversation in rows:
                await self.orchestrator.close(session, conversation, "idle")
            return len(rows)

    @retry_transient
    async def disconnect_silent_agents(self, db: Database, limit: int) -> int:
        async with db.transaction() as session:
            agents = await self._claim(session, Agent, self.presence_due, Agent.last_heartbeat_at, limit)
            for agent in agents:
                await self.orchestrator.agent_disconnected(session, agent.id, "heartbeat lapsed")
            return len(agents)

    @retry_transient
    async def hand_on_orphans(self, db: Database, limit: int) -> int:
        async with db.transaction() as session:
            rows = await self._claim(session, Conversation, self.orphan_due, Conversation.assigned_at, limit)
            if rows:
                await queue.lock(session)  # lock order: the rotation before any agent row
            for conversation in rows:
                await queue.release(session, conversation.agent_id)
                await self.orchestrator.hand_on_one(session, conversation, "agent disconnected")
            return len(rows)

    @retry_transient
    async def reassign_unanswered(self, db: Database, limit: int) -> int:
        if self.config.reply_timeout_s <= 0:
            return 0
        async with db.transaction() as session:
            rows = await self._claim(
                session, Conversation, self.reply_due, Conversation.awaiting_reply_since, limit
            )
            for conversation in rows:
                await self.orchestrator.reassign(session, conversation, "no agent reply")
            return len(rows)

    @retry_transient
    async def distribute_to_free_room(self, db: Database, limit: int) -> int:
        """``distribute_pending`` whenever a pending conversation and an agent with room coexist."""
        async with db.transaction() as session:
            now: datetime = session.info["now"]
            found = await session.scalar(select(Conversation.id).where(self.room_due(now)).limit(1))
            if found is None:
                return 0
            return await self.orchestrator.distribute_pending(session, limit)

    @retry_transient
    async def scheduled_distribution(self, db: Database, limit: int) -> int:
        """At each time of the schedule: ``distribute_pending`` (seed 001 §6.4), once across instances."""
        if self.config.schedule is None:
            return 0
        async with db.transaction() as session:
            now: datetime = session.info["now"]
            run = await session.scalar(
                select(ScheduledRun)
                .where(ScheduledRun.name == DISTRIBUTION)
                .with_for_update(skip_locked=True, key_share=True)
                .execution_options(populate_existing=True)
            )
            if run is None or run.expression != self.config.schedule:
                await self._plan(session, now)
                return 0
            if run.next_run_at > now:
                return 0
            assigned = await self.orchestrator.distribute_pending(session, limit)
            run.next_run_at = next_run(self.config.schedule, self.config.timezone, now)
            return assigned

    async def _plan(self, session: AsyncSession, now: datetime) -> None:
        run = await session.get(ScheduledRun, DISTRIBUTION)
        upcoming = next_run(self.config.schedule or "", self.config.timezone, now)
        if run is None:
            try:  # two instances' first tick both find no row: one plans, the other moves on
                async with session.begin_nested():
                    session.add(
                        ScheduledRun(name=DISTRIBUTION, next_run_at=upcoming, expression=self.config.schedule)
                    )
            except IntegrityError:
                pass
        else:
            run.next_run_at, run.expression = upcoming, self.config.schedule or ""

    @retry_transient
    async def alert_on_pending(self, db: Database, limit: int) -> int:
        """One admin alert per cooldown while any conversation has waited too long for an agent (not while
        no agent exists: the business does not use the dispatcher)."""
        async with db.transaction() as session:
            now: datetime = session.info["now"]
            waiting = await session.scalar(
                select(func.count()).select_from(Conversation).where(self.pending_alert_due(now))
            )
            if not waiting:
                return 0
            if not await session.scalar(select(func.count()).select_from(Agent)):
                return 0  # no agent at all: this business does not use the dispatcher
            state = await session.scalar(
                lock_for_update(select(AlertState).where(AlertState.rule == PENDING_ALERT_RULE))
            )
            if state is not None and now - state.last_fired_at < PENDING_ALERT_COOLDOWN:
                return 0
            minutes = round(self.config.pending_alert_s / 60)
            detail = f"{waiting} conversation(s) wait for an agent for more than {minutes} min"
            if state is None:
                try:
                    async with session.begin_nested():
                        session.add(AlertState(rule=PENDING_ALERT_RULE, last_fired_at=now, detail=detail))
                except IntegrityError:
                    return 0  # another instance fired it a moment ago
            else:
                state.last_fired_at, state.detail = now, detail
            await outbox.enqueue(
                session,
                [
                    Message(recipient=phone, category=ADMIN_ALERT, body=f"🚨 *ALERTE ADMIN*\n\n{detail}.")
                    for phone in self.config.admin_phones or ("admin",)
                ],
            )
            return 1

    async def _claim(
        self,
        session: AsyncSession,
        model: type,
        due: Callable[[datetime], ColumnElement[bool]],
        order: ColumnElement,
        limit: int,
    ) -> list:
        now: datetime = session.info["now"]
        rows = await session.scalars(
            select(model)
            .where(due(now))
            .order_by(order)
            .limit(limit)
            .with_for_update(skip_locked=True, key_share=True)
            .execution_options(populate_existing=True)
        )
        return list(rows.all())

    # ------------------------------------------------------------------------------------ deadlines

    def _oldest(self, column, due: Callable[[datetime], ColumnElement[bool]], delay_s: float = 0.0):
        async def oldest_due(session: AsyncSession, now: datetime) -> datetime | None:
            first = await session.scalar(select(func.min(column)).where(due(now)))
            return None if first is None else first + timedelta(seconds=delay_s)

        return oldest_due

    def deadlines(self) -> list[Deadline]:
        """In this order each tick: presence, orphans, reply timeout, idle close, free room, schedule,
        alert."""
        config = self.config

        async def schedule_due(session: AsyncSession, now: datetime) -> datetime | None:
            if config.schedule is None:
                return None
            return await session.scalar(
                select(ScheduledRun.next_run_at).where(
                    ScheduledRun.name == DISTRIBUTION, ScheduledRun.next_run_at <= now
                )
            )

        async def orphans_due(session: AsyncSession, now: datetime) -> datetime | None:
            # due from the moment they are seen: handled at the next tick
            found = await session.scalar(select(Conversation.id).where(self.orphan_due(now)).limit(1))
            return now if found is not None else None

        async def no_lag(_session: AsyncSession, _now: datetime) -> datetime | None:
            return None  # an alert with a cooldown is never "late"

        return [
            Deadline(
                "agent_presence",
                self.disconnect_silent_agents,
                self._oldest(Agent.last_heartbeat_at, self.presence_due, config.presence_timeout_s),
            ),
            Deadline("orphaned_conversations", self.hand_on_orphans, orphans_due),
            Deadline(
                "agent_reply_timeout",
                self.reassign_unanswered,
                self._oldest(Conversation.awaiting_reply_since, self.reply_due, config.reply_timeout_s),
            ),
            Deadline(
                "conversation_idle_close",
                self.check_response_timeout,
                self._oldest(Conversation.last_customer_message_at, self.idle_due, config.idle_close_s),
            ),
            Deadline(
                "pending_distribution",
                self.distribute_to_free_room,
                self._oldest(Conversation.pending_since, self.room_due),
            ),
            Deadline(DISTRIBUTION, self.scheduled_distribution, schedule_due),
            Deadline("conversation_pending_alert", self.alert_on_pending, no_lag),
        ]
