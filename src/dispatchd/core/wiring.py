"""What a domain package gives the application to assemble, and what it is given to build it.

Each domain package (``notifications``, ``matching``, ``reservations``, ``dispatcher``, ``realtime``) has a
``wiring.build(context) -> Domain``. The assembly (:mod:`dispatchd.assembly`) calls them in order,
registers their deadlines on the one sweeper, their inbound handlers on the one inbox, their
coalescers on the one delivery worker, mounts their routers and runs their background tasks;
``/v1/health`` and ``/metrics`` ask each for its contribution. Nothing outside a domain package knows
its tables.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.config import Settings
from dispatchd.core.db import Database
from dispatchd.core.inbound import InboundHandler
from dispatchd.core.sweeper import Deadline, Sweeper

#: ``(component, summary metrics)`` of ``/v1/health``: the component has ``status`` (a
#: :class:`dispatchd.core.health.Level`) and its figures; the summary feeds the report's ``metrics``.
HealthContribution = tuple[dict[str, Any], dict[str, Any]]

#: ``async rule(session, now) -> list[Alert]``: one domain's admin alert rule, given a read session and
#: the clock's time (UTC); it returns the :class:`dispatchd.notifications.alerts.Alert` s that hold now
#: (the monitor applies cooldowns and severities).
AlertRule = Callable[[AsyncSession, datetime], Awaitable[list[Any]]]


@dataclass
class Context:
    """Shared by every domain while the app is built. ``inbound_handlers`` and ``coalescers`` are
    filled by the assembly from every domain, in order, after all are built."""

    settings: Settings
    db: Database
    sweeper: Sweeper
    inbound_handlers: list[InboundHandler] = field(default_factory=list)
    #: notification category → function merging a paced recipient's open rows into one message
    coalescers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    #: domain name → its service, filled as each domain is built (a later domain may use an earlier's)
    services: dict[str, Any] = field(default_factory=dict)
    #: every domain's admin alert rules, filled by the assembly after all are built (the alert monitor
    #: of ``notifications`` holds this list)
    alert_rules: list[AlertRule] = field(default_factory=list)


@dataclass
class Domain:
    """One domain, as the app assembles it."""

    name: str
    #: the domain's service object (``MatchingService``…), reached by its routers through
    #: ``request.app.state.services``
    service: Any = None
    routers: Sequence[APIRouter] = ()
    openapi_tags: Sequence[dict[str, str]] = ()
    deadlines: Sequence[Deadline] = ()
    inbound_handlers: Sequence[InboundHandler] = ()
    coalescers: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    #: its component of ``/v1/health``, or None
    health: Callable[[], Awaitable[HealthContribution]] | None = None
    #: refreshes its Prometheus gauges at each scrape of ``/metrics``
    refresh_metrics: Callable[[], Awaitable[None]] | None = None
    #: loops run for the life of the process, each until the event is set
    background: Mapping[str, Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=dict)
    #: subject kind (``driver``) → whether a subject id exists, for keys bound to a subject
    subjects: Mapping[str, Callable[[AsyncSession, str], Awaitable[bool]]] = field(default_factory=dict)
    #: called after every commit with the session's ``info`` (wake-ups, cache invalidation)
    on_commit: Sequence[Callable[[dict], None]] = ()
    #: anything else its routers need (rate limiter, caches…)
    extras: Mapping[str, Any] = field(default_factory=dict)
    #: releases what it holds (open streams, listener connections) when the process stops
    close: Callable[[], Awaitable[None]] | None = None
    #: admin alert rules evaluated by the 60 s alert monitor (:data:`AlertRule`)
    alert_rules: Sequence[AlertRule] = ()
