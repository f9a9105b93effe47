"""The dispatcher domain (seed 001) as the app assembles it: its service, routes, deadlines, the inbound
handler that takes every customer message matching does not, its gauges, and the ``agent`` subject of
agent keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import topics
from dispatchd.core.health import grade
from dispatchd.core.wiring import Context, Domain, HealthContribution
from dispatchd.dispatcher import metrics, router
from dispatchd.dispatcher.inbound import CustomerMessage
from dispatchd.dispatcher.models import Agent, Conversation, ConversationStatus, Presence
from dispatchd.dispatcher.orchestrator import DispatcherConfig, Orchestrator
from dispatchd.dispatcher.scheduler import Scheduler, SchedulerConfig
from dispatchd.dispatcher.service import DispatcherService


async def _agent_exists(session: AsyncSession, agent_id: str) -> bool:
    return await session.scalar(select(Agent.id).where(Agent.id == agent_id)) is not None


def build(context: Context) -> Domain:
    settings, db = context.settings, context.db
    orchestrator = Orchestrator(DispatcherConfig(pending_notice=settings.pending_notice))
    scheduler = Scheduler(
        orchestrator,
        SchedulerConfig(
            idle_close_s=settings.conversation_idle_close_s,
            presence_timeout_s=settings.agent_presence_timeout_s,
            reply_timeout_s=settings.agent_reply_timeout_s,
            pending_alert_s=settings.pending_alert_s,
            schedule=settings.dispatch_schedule,
            timezone=settings.timezone,
            admin_phones=tuple(settings.admin_phones),
        ),
    )
    service = DispatcherService(db, orchestrator, presence_timeout_s=settings.agent_presence_timeout_s)

    async def refresh_metrics() -> None:
        async with db.read() as session:
            now: datetime = session.info["now"]
            counts = dict(
                (
                    await session.execute(
                        select(Conversation.status, func.count())
                        .where(Conversation.status != ConversationStatus.CLOSED.value)
                        .group_by(Conversation.status)
                    )
                ).all()
            )
            oldest = await session.scalar(
                select(func.min(Conversation.pending_since)).where(
                    Conversation.status == ConversationStatus.PENDING.value
                )
            )
            loads = (
                await session.execute(
                    select(Agent.id, Agent.open_conversations).where(Agent.presence != Presence.OFFLINE.value)
                )
            ).all()
        for status in (ConversationStatus.PENDING, ConversationStatus.ASSIGNED):
            metrics.CONVERSATIONS_BY_STATUS.labels(status.value).set(counts.get(status.value, 0))
        metrics.PENDING_OLDEST.set((now - oldest).total_seconds() if oldest else 0.0)
        metrics.AGENT_LOAD.clear()
        for agent_id, load in loads:
            metrics.AGENT_LOAD.labels(agent_id).set(load)

    async def health() -> HealthContribution:
        """Pending conversations graded by the oldest wait: ``DISPATCHD_PENDING_ALERT_S`` WARNING, 3×
        CRITICAL; not graded while no agent exists (a business that does not use the dispatcher)."""
        async with db.read() as session:
            now: datetime = session.info["now"]
            waiting, oldest = (
                await session.execute(
                    select(func.count(), func.min(Conversation.pending_since)).where(
                        Conversation.status == ConversationStatus.PENDING.value
                    )
                )
            ).one()
            online = await session.scalar(
                select(func.count()).select_from(Agent).where(Agent.presence == Presence.ONLINE.value)
            )
            agents = await session.scalar(select(func.count()).select_from(Agent))
        age = (now - oldest).total_seconds() if oldest else None
        bound = settings.pending_alert_s
        component = {
            "status": grade(age if agents else None, bound, 3 * bound),
            "agents_online": int(online or 0),
            "pending_conversations": int(waiting or 0),
            "oldest_pending_s": None if age is None else round(age, 3),
        }
        return component, {}

    return Domain(
        name="dispatcher",
        health=health,
        service=service,
        routers=(router.router,),
        openapi_tags=(
            {
                "name": "dispatcher",
                "description": "Agents, conversations, round-robin distribution (seed 001)",
            },
        ),
        deadlines=scheduler.deadlines(),
        inbound_handlers=(CustomerMessage(orchestrator),),
        refresh_metrics=refresh_metrics,
        subjects={topics.AGENT: _agent_exists},
        extras={"scheduler": scheduler, "orchestrator": orchestrator},
    )
