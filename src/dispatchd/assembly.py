"""The composition root: one database, one sweeper, one key cache, and the domains, in order.

Adding a domain is a package with a ``wiring.build(context) -> Domain`` and one line in
:data:`DOMAINS`. The order matters where domains meet: inbound handlers are offered a message in this
order, and the sweeper runs the deadlines in this order each tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.config import Settings
from dispatchd.core.clock import Clock
from dispatchd.core.db import Database
from dispatchd.core.sweeper import Sweeper
from dispatchd.core.wiring import Context, Domain
from dispatchd.deps import PrincipalCache
from dispatchd.dispatcher import wiring as dispatcher
from dispatchd.matching import wiring as matching
from dispatchd.notifications import wiring as notifications
from dispatchd.realtime import wiring as realtime
from dispatchd.reservations import wiring as reservations
from dispatchd.web import wiring as console

#: ``inbound_messages.handler`` holds the name of the handler that took a message
HANDLER_NAME_MAX = 40

DOMAINS = (
    notifications.build,
    matching.build,
    reservations.build,
    dispatcher.build,  # after matching: it takes every inbound message matching does not
    realtime.build,  # after the dispatcher: agents' streams carry their presence to it
    console.build,  # the operator console reads every domain
)


@dataclass
class Services:
    """Everything one process runs (``app.state.services``); the tests build it with a manual clock."""

    settings: Settings
    db: Database
    sweeper: Sweeper
    domains: list[Domain]
    principals: PrincipalCache = field(init=False)

    def __post_init__(self) -> None:
        self.principals = PrincipalCache(self.settings.auth_cache_s)

    async def aclose(self) -> None:
        """Release what the domains hold (streams, listeners), then the database's connections."""
        for domain in reversed(self.domains):
            if domain.close is not None:
                await domain.close()
        await self.db.dispose()

    def domain(self, name: str) -> Domain:
        """The domain called ``name``; raises :class:`KeyError` when none is assembled."""
        for domain in self.domains:
            if domain.name == name:
                return domain
        raise KeyError(name)

    async def subject_exists(self, session: AsyncSession, subject: str) -> bool:
        """Whether ``kind:id`` names a row of the domain that owns that kind (``driver:drv_…``)."""
        kind, _, row_id = subject.partition(":")
        for domain in self.domains:
            exists = domain.subjects.get(kind)
            if exists is not None:
                return await exists(session, row_id)
        return False

    # Shortcuts for the CLI, benchmarks and tests.
    @property
    def matching(self):
        return self.domain("matching").service

    @property
    def reservations(self):
        return self.domain("reservations").service

    @property
    def delivery(self):
        return self.domain("notifications").extras["delivery"]

    @property
    def alerts(self):
        return self.domain("notifications").extras["alerts"]

    @property
    def dispatcher(self):
        return self.domain("dispatcher").service

    @property
    def realtime(self):
        return self.domain("realtime").service

    @property
    def inbox(self):
        return self.domain("notifications").extras["inbox"]


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    """Build the database, the sweeper and every domain of :data:`DOMAINS`, and join their seams."""
    db = Database(settings.database_url, clock=clock)
    sweeper = Sweeper(db, interval_s=settings.sweep_interval_s, batch_size=settings.sweep_batch_size)
    context = Context(settings, db, sweeper)
    domains = []
    for build in DOMAINS:
        domains.append(build(context))
        context.services[domains[-1].name] = domains[-1].service
    for domain in domains:
        for deadline in domain.deadlines:
            sweeper.register(deadline)
        for handler in domain.inbound_handlers:
            if len(handler.name) > HANDLER_NAME_MAX:
                raise ValueError(
                    f"inbound handler name {handler.name!r} is over {HANDLER_NAME_MAX} characters"
                )
        context.inbound_handlers.extend(domain.inbound_handlers)
        context.coalescers.update(domain.coalescers)
        context.alert_rules.extend(domain.alert_rules)
        db.after_commit.extend(domain.on_commit)
    return Services(settings, db, sweeper, domains)
