"""What each console page shows, read from the domains' tables and services (no writes here).

Each function takes the services and returns plain dicts and lists for the templates; times are UTC
datetimes (the templates format them in ``DISPATCHD_TIMEZONE``), durations are seconds.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from dispatchd.core import events, topics
from dispatchd.core.stats import percentile
from dispatchd.dispatcher.models import Agent, Conversation, ConversationMessage, ConversationStatus
from dispatchd.health import health_report
from dispatchd.matching import stats as matching_stats
from dispatchd.matching.models import Booking, BookingOffer, BookingStatus, Driver, MatchingMetrics
from dispatchd.notifications import admin as notifications_admin
from dispatchd.notifications.models import Notification, NotificationStatus
from dispatchd.reservations.models import Resource, WaitingListEntry

if TYPE_CHECKING:
    from dispatchd.assembly import Services

RECENT = 20


def _start_of_day(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


# ----------------------------------------------------------------------------------------- matching


async def searches(services: Services) -> list[dict[str, Any]]:
    """Bookings SEARCHING now, oldest first: wave, drivers notified, the search's deadline."""
    async with services.db.read() as session:
        rows = (
            await session.execute(
                select(Booking, func.count(BookingOffer.id))
                .outerjoin(BookingOffer, BookingOffer.booking_id == Booking.id)
                .where(Booking.status == BookingStatus.SEARCHING.value)
                .group_by(Booking.id)
                .order_by(Booking.search_started_at)
                .limit(200)
            )
        ).all()
        now = session.info["now"]
    return [
        {
            "id": booking.id,
            "customer_name": booking.customer_name,
            "pickup_address": booking.pickup_address,
            "wave": booking.wave,
            "drivers_notified": notified,
            "started_at": booking.search_started_at,
            "deadline_at": booking.search_deadline_at,
            "left_s": max(0.0, (booking.search_deadline_at - now).total_seconds())
            if booking.search_deadline_at
            else None,
        }
        for booking, notified in rows
    ]


async def recent_outcomes(services: Services) -> list[dict[str, Any]]:
    """The last bookings that ended their search: ASSIGNED, TIMEOUT or CANCELLED, newest first."""
    async with services.db.read() as session:
        rows = (
            await session.scalars(
                select(Booking)
                .where(
                    Booking.status.in_(
                        [
                            BookingStatus.ASSIGNED.value,
                            BookingStatus.TIMEOUT.value,
                            BookingStatus.CANCELLED.value,
                            BookingStatus.COMPLETED.value,
                        ]
                    )
                )
                .order_by(Booking.updated_at.desc())
                .limit(RECENT)
            )
        ).all()
    return [
        {
            "id": booking.id,
            "status": booking.status,
            "customer_name": booking.customer_name,
            "pickup_address": booking.pickup_address,
            "driver_id": booking.driver_id,
            "at": booking.updated_at,
            "restartable": booking.status == BookingStatus.TIMEOUT.value,
            "cancellable": booking.status == BookingStatus.ASSIGNED.value,
        }
        for booking in rows
    ]


async def today(services: Services) -> dict[str, Any]:
    """Since midnight UTC: time to match p50/p95 (s), acceptance and timeout rates."""
    now = services.db.clock.now()
    figures = await matching_stats.matching_stats(services.db, _start_of_day(now), now + timedelta(seconds=1))
    return figures


async def drivers(services: Services) -> dict[str, Any]:
    """Drivers by status and each driver's last sign of life; positions for the scatter."""
    async with services.db.read() as session:
        rows = (await session.scalars(select(Driver).order_by(Driver.last_seen_at.desc()).limit(500))).all()
        pickups = (
            await session.execute(
                select(Booking.id, Booking.pickup_lat, Booking.pickup_lon).where(
                    Booking.status == BookingStatus.SEARCHING.value, Booking.pickup_lat.is_not(None)
                )
            )
        ).all()
    by_status: dict[str, int] = {}
    for driver in rows:
        by_status[driver.status] = by_status.get(driver.status, 0) + 1
    return {
        "by_status": dict(sorted(by_status.items())),
        "drivers": rows[:100],
        "scatter": _scatter(
            [(d.lat, d.lon, d.status) for d in rows if d.lat is not None and d.lon is not None],
            [(lat, lon, "PICKUP") for _, lat, lon in pickups],
        ),
    }


def _scatter(points: list[tuple[float, float, str]], pickups: list[tuple[float, float, str]]) -> dict:
    """Points projected into a 100 × 100 box (equirectangular, enough at a city's scale)."""
    every = points + pickups
    if not every:
        return {"points": []}
    lats = [p[0] for p in every]
    lons = [p[1] for p in every]
    lat_span = max(max(lats) - min(lats), 1e-3)
    lon_span = max(max(lons) - min(lons), 1e-3)
    return {
        "points": [
            {
                "x": round(4 + 92 * (lon - min(lons)) / lon_span, 2),
                "y": round(96 - 92 * (lat - min(lats)) / lat_span, 2),
                "kind": kind,
            }
            for lat, lon, kind in every
        ]
    }


# ----------------------------------------------------------------------------------------- conversations


async def rotation(services: Services) -> list[dict[str, Any]]:
    """Every agent, the rotation first: place, presence, load, capacity."""
    return [
        {
            "id": agent.id,
            "name": agent.name,
            "place": place,
            "presence": agent.presence,
            "load": agent.open_conversations,
            "capacity": agent.capacity,
            "last_heartbeat_at": agent.last_heartbeat_at,
        }
        for agent, place in await services.dispatcher.queue_view()
    ]


async def conversations(services: Services, agent_id: str | None) -> dict[str, Any]:
    """Pending conversations with their age; open conversations (an agent's own when ``agent_id``)."""
    async with services.db.read() as session:
        now = session.info["now"]
        pending = (
            await session.scalars(
                select(Conversation)
                .where(Conversation.status == ConversationStatus.PENDING.value)
                .order_by(Conversation.pending_since)
                .limit(200)
            )
        ).all()
        query = select(Conversation).where(Conversation.status == ConversationStatus.ASSIGNED.value)
        if agent_id is not None:
            query = query.where(Conversation.agent_id == agent_id)
        assigned = (
            await session.scalars(query.order_by(Conversation.last_message_at.desc()).limit(200))
        ).all()
        agents = dict((await session.execute(select(Agent.id, Agent.name))).all())
    return {
        "pending": [
            {
                "id": c.id,
                "customer_phone": c.customer_phone,
                "age_s": (now - (c.pending_since or c.opened_at)).total_seconds(),
            }
            for c in pending
        ],
        "assigned": [
            {
                "id": c.id,
                "customer_phone": c.customer_phone,
                "agent_id": c.agent_id,
                "agent_name": agents.get(c.agent_id),
                "last_message_at": c.last_message_at,
                "awaiting_reply": c.awaiting_reply_since is not None,
            }
            for c in assigned
        ],
    }


async def thread(services: Services, conversation_id: str) -> dict[str, Any]:
    conversation = await services.dispatcher.get_conversation(conversation_id)
    async with services.db.read() as session:
        messages = (
            await session.scalars(
                select(ConversationMessage)
                .where(ConversationMessage.conversation_id == conversation_id)
                .order_by(ConversationMessage.created_at, ConversationMessage.id)
                .limit(500)
            )
        ).all()
    return {"conversation": conversation, "messages": messages}


# ----------------------------------------------------------------------------------------- reservations


async def resources(services: Services) -> list[dict[str, Any]]:
    async with services.db.read() as session:
        rows = (await session.scalars(select(Resource).order_by(Resource.id).limit(500))).all()
        waiting = dict(
            (
                await session.execute(
                    select(WaitingListEntry.resource_id, func.count())
                    .where(WaitingListEntry.status.in_(["WAITING", "OFFERED"]))
                    .group_by(WaitingListEntry.resource_id)
                )
            ).all()
        )
    return [
        {
            "id": r.id,
            "name": r.name,
            "type": r.type,
            "state": r.state,
            "capacity": r.capacity,
            "reserved": r.reserved,
            "held": r.held,
            "available": max(0, r.capacity - r.reserved - r.held),
            "waiting": waiting.get(r.id, 0),
            "version": r.version,
        }
        for r in rows
    ]


async def waiting_list(services: Services, resource_id: str) -> list[WaitingListEntry]:
    async with services.db.read() as session:
        return list(
            (
                await session.scalars(
                    select(WaitingListEntry)
                    .where(
                        WaitingListEntry.resource_id == resource_id,
                        WaitingListEntry.status.in_(["WAITING", "OFFERED"]),
                    )
                    .order_by(WaitingListEntry.created_at, WaitingListEntry.id)
                    .limit(200)
                )
            ).all()
        )


# ----------------------------------------------------------------------------------------- notifications


async def outbox(services: Services) -> dict[str, Any]:
    """Backlog, failure rate and circuits (the outbox's health), the failed messages, the alerts."""
    health = await notifications_admin.health(services.db, services.delivery.breakers)
    async with services.db.read() as session:
        failed = (
            await session.scalars(
                select(Notification)
                .where(
                    Notification.status.in_(
                        [NotificationStatus.FAILED.value, NotificationStatus.FAILED_PERMANENT.value]
                    )
                )
                .order_by(Notification.failed_at.desc())
                .limit(50)
            )
        ).all()
        alerts = await events.read(
            session,
            after_id=max(0, await events.last_id(session) - 100_000),
            topics=[topics.ALERTS],
            limit=1000,
        )
    return {"health": health, "failed": failed, "alerts": list(reversed(alerts[-30:]))}


# ----------------------------------------------------------------------------------------- health, reports


async def health(services: Services) -> dict[str, Any]:
    return await health_report(services.db, services.sweeper, services.domains, services.settings)


async def by_hour(services: Services, hours: int = 24) -> dict[str, list]:
    """The last ``hours`` hours: per hour (UTC), searches finished, matched share, time to match p50 (s)."""
    now = services.db.clock.now()
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
    async with services.db.read() as session:
        rows = (
            await session.execute(
                select(
                    MatchingMetrics.created_at, MatchingMetrics.final_status, MatchingMetrics.time_to_match_s
                )
                .where(MatchingMetrics.created_at >= start)
                .limit(100_000)
            )
        ).all()
    buckets: list[list] = [[] for _ in range(hours)]
    for created_at, final_status, time_to_match in rows:
        index = int((created_at - start).total_seconds() // 3600)
        if 0 <= index < hours:
            buckets[index].append((final_status, time_to_match))
    hours_ts, acceptance, p50 = [], [], []
    for index, bucket in enumerate(buckets):
        hours_ts.append(int((start + timedelta(hours=index)).timestamp()))
        finished = [status for status, _ in bucket if status]
        matched = [t for status, t in bucket if status == "MATCHED" and t is not None]
        acceptance.append(round(100 * len(matched) / len(finished), 1) if finished else None)
        p50.append(round(percentile(sorted(matched), 50), 1) if matched else None)
    return {"hours": hours_ts, "acceptance_pct": acceptance, "time_to_match_p50_s": p50}


async def per_driver(services: Services) -> list[dict[str, Any]]:
    now = services.db.clock.now()
    figures = await matching_stats.matching_stats(services.db, now - timedelta(hours=24), now)
    return figures.get("drivers", [])
