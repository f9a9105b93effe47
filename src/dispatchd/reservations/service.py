"""Reservation engine (seed 003): capacity booked atomically, never overbooked, with a waiting list.

The commit (one conditional UPDATE, group-committed under load) is in
:mod:`dispatchd.reservations.commit`. The server's clock stamps every reservation (seed 003 "Timestamp
Authority"); every time is UTC.

:class:`ReservationService` is the one entry point the routers, the CLI, the sweeper and the benchmarks
use: resources and their admin operations (audited), the commit, cancellation and the reads live here;
the waiting list and its holds in :mod:`dispatchd.reservations.waiting_list`; what both share (refusals,
settings, outcome shapes, get-or-404 readers) in :mod:`dispatchd.reservations.common`.

Lock order, everywhere: resource → reservation / waiting-list entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events
from dispatchd.core.db import Database, retry_transient
from dispatchd.core.errors import Conflict, InvalidState
from dispatchd.core.ids import new_id
from dispatchd.reservations.commit import ReservationCommit
from dispatchd.reservations.common import (
    REFUSALS,
    CommitOutcome,
    Idempotency,
    ReservationsConfig,
    ResourceClosed,
    ResourceFull,
    audit,
    now,
    reservation_or_404,
    resource_or_404,
    resource_snapshot,
    topic,
    touch,
)
from dispatchd.reservations.models import (
    AuditEntry,
    Reservation,
    ReservationStatus,
    Resource,
    ResourceState,
    WaitingListEntry,
)
from dispatchd.reservations.waiting_list import WaitingList

__all__ = [
    "REFUSALS",
    "CommitOutcome",
    "Idempotency",
    "ReservationService",
    "ReservationsConfig",
    "ResourceClosed",
    "ResourceFull",
    "audit",
    "resource_snapshot",
]


class ReservationService:
    """Seed 003 ReservationCommitService plus admin operations and the waiting list.

    Errors: :class:`~dispatchd.core.errors.NotFound` with ``RESOURCE_NOT_FOUND``,
    ``RESERVATION_NOT_FOUND`` or ``WAITING_LIST_ENTRY_NOT_FOUND``; :class:`InvalidState` (409);
    :class:`InvalidInput` (422); :class:`ResourceClosed` (409). A full or closed resource is an outcome
    of :meth:`reserve`, not an exception."""

    def __init__(self, db: Database, config: ReservationsConfig | None = None) -> None:
        self.db = db
        self.config = config or ReservationsConfig()
        self.waiting_list = WaitingList(db, self.config)
        #: the commit and its group commit (:mod:`dispatchd.reservations.commit`)
        self.commit = ReservationCommit(db, self.config)

    # -------------------------------------------------------------- resources

    @retry_transient
    async def create_resource(self, data: dict[str, Any], actor: str) -> Resource:
        """Create an OPEN resource (``data``: type, name, capacity ≥ 0, optional id, metadata). Audited
        (``resource.create``), and ``ResourceCreated`` on ``resource:<id>``. Raises :class:`Conflict`
        (409 CONFLICT) when a resource with this id exists."""
        try:
            async with self.db.transaction() as session:
                resource = self._new_resource(session, data)
                session.add(resource)
                await session.flush()
                audit(session, actor, "resource.create", resource.id, None, resource_snapshot(resource))
                events.append(session, topic(resource.id), "ResourceCreated", resource_snapshot(resource))
        except IntegrityError:
            raise Conflict(f"a resource with id {data.get('id')!r} already exists") from None
        return resource

    def _new_resource(self, session: AsyncSession, data: dict[str, Any]) -> Resource:
        at = now(session)
        return Resource(
            id=data.get("id") or new_id("res"),
            type=data["type"],
            name=data["name"],
            capacity=data["capacity"],
            reserved=0,
            held=0,
            version=1,
            state=data.get("state") or ResourceState.OPEN.value,
            metadata_=data.get("metadata"),
            created_at=at,
            updated_at=at,
        )

    async def import_resources(self, rows: list[dict[str, Any]], actor: str) -> list[Resource]:
        """Create every resource of ``rows`` (as :meth:`create_resource`'s ``data``, plus ``state``) in one
        transaction: all or nothing. Raises :class:`Conflict` when an id already exists."""
        try:
            async with self.db.transaction() as session:
                created = [self._new_resource(session, row) for row in rows]
                session.add_all(created)
                await session.flush()
                for resource in created:
                    audit(session, actor, "resource.import", resource.id, None, resource_snapshot(resource))
                    events.append(session, topic(resource.id), "ResourceCreated", resource_snapshot(resource))
        except IntegrityError:
            raise Conflict("a resource id in the file already exists; nothing was imported") from None
        return created

    async def get_resource(self, resource_id: str) -> Resource:
        """One resource; raises :class:`NotFound` ``RESOURCE_NOT_FOUND``."""
        async with self.db.read() as session:
            return await resource_or_404(session, resource_id)

    @retry_transient
    async def set_capacity(self, resource_id: str, capacity: int, actor: str) -> Resource:
        """Resize. Below what is reserved or held → :class:`InvalidState`; a larger capacity is offered to
        the waiting list first. Raises :class:`NotFound` ``RESOURCE_NOT_FOUND``. Audited."""
        async with self.db.transaction() as session:
            resource = await resource_or_404(session, resource_id, lock=True)
            before = resource_snapshot(resource)
            if capacity < resource.reserved + resource.held:
                raise InvalidState(
                    f"capacity {capacity} is below the {resource.reserved} places reserved"
                    f" and {resource.held} held for the waiting list"
                )
            resource.capacity = capacity
            await self._changed(session, resource, "ResourceResized", actor, "resource.resize", before)
            await self.waiting_list.offer_freed_places(session, resource)
        return resource

    async def close(self, resource_id: str, actor: str) -> Resource:
        """Stop selling (commits answer RESOURCE_CLOSED); reservations stay. Raises :class:`NotFound`
        ``RESOURCE_NOT_FOUND``, :class:`InvalidState` when already closed. Audited."""
        return await self._set_state(resource_id, ResourceState.CLOSED, actor)

    async def reopen(self, resource_id: str, actor: str) -> Resource:
        """Sell again; free places go to the waiting list first. Raises :class:`NotFound`
        ``RESOURCE_NOT_FOUND``, :class:`InvalidState` when already open. Audited."""
        return await self._set_state(resource_id, ResourceState.OPEN, actor)

    @retry_transient
    async def _set_state(self, resource_id: str, state: ResourceState, actor: str) -> Resource:
        async with self.db.transaction() as session:
            resource = await resource_or_404(session, resource_id, lock=True)
            if resource.state == state:
                raise InvalidState(f"resource {resource_id} is already {state}")
            before = resource_snapshot(resource)
            resource.state = state.value
            kind = "ResourceReopened" if state is ResourceState.OPEN else "ResourceClosed"
            await self._changed(session, resource, kind, actor, f"resource.{kind[8:].lower()}", before)
            if state is ResourceState.OPEN:
                await self.waiting_list.offer_freed_places(session, resource)
        return resource

    async def _changed(
        self, session: AsyncSession, resource: Resource, kind: str, actor: str, action: str, before: dict
    ) -> None:
        resource.version += 1
        resource.updated_at = now(session)
        await session.flush()
        after = resource_snapshot(resource)
        audit(session, actor, action, resource.id, before, after)
        events.append(session, topic(resource.id), kind, {**after, "actor": actor})
        touch(session, resource.id)

    # ------------------------------------------------------------ the commit

    async def reserve(
        self, resource_id: str, client_id: str, quantity: int, idem: Idempotency | None = None
    ) -> CommitOutcome:
        """See :meth:`ReservationCommit.reserve` (seed 003 §1.4): book ``quantity`` places atomically, or
        refuse (RESOURCE_FULL, RESOURCE_CLOSED outcomes). Raises :class:`NotFound` (RESOURCE_NOT_FOUND) and
        :class:`InvalidInput` (quantity out of 1..max, IDEMPOTENCY_KEY_REUSED)."""
        return await self.commit.reserve(resource_id, client_id, quantity, idem)

    async def get_reservation(self, reservation_id: str) -> Reservation:
        """One reservation; raises :class:`NotFound` ``RESERVATION_NOT_FOUND``."""
        async with self.db.read() as session:
            return await reservation_or_404(session, reservation_id)

    @retry_transient
    async def cancel(self, reservation_id: str) -> Reservation:
        """Cancel a CONFIRMED reservation; its places go to the waiting list first. Raises
        :class:`NotFound` ``RESERVATION_NOT_FOUND``, :class:`InvalidState` (already cancelled)."""
        async with self.db.transaction() as session:
            at = now(session)
            found = await reservation_or_404(session, reservation_id)
            resource = await resource_or_404(session, found.resource_id, lock=True)
            reservation = await reservation_or_404(session, reservation_id)  # again, under the lock
            if reservation.status != ReservationStatus.CONFIRMED:
                raise InvalidState(f"reservation {reservation_id} is already {reservation.status}")
            reservation.status = ReservationStatus.CANCELLED.value
            reservation.cancelled_at = at
            resource.reserved -= reservation.quantity
            resource.version += 1
            resource.updated_at = at
            await session.flush()
            events.append(
                session,
                topic(resource.id),
                "ReservationCancelled",
                {
                    "reservation_id": reservation.id,
                    "client_id": reservation.client_id,
                    "quantity": reservation.quantity,
                    "reserved": resource.reserved,
                    "held": resource.held,
                    "capacity": resource.capacity,
                    "version": resource.version,
                    "at": at.isoformat(),
                },
            )
            touch(session, resource.id)
            await self.waiting_list.offer_freed_places(session, resource)
        return reservation

    # ----------------------------------------------- waiting list (waiting_list.py)

    async def join_waiting_list(
        self, resource_id: str, client_id: str, quantity: int, contact: str | None
    ) -> WaitingListEntry:
        """See :meth:`WaitingList.join`: an entry ``WAITING`` in server-timestamp order. Raises
        :class:`InvalidState` when the places are free now (reserve them), ResourceClosed when closed."""
        return await self.waiting_list.join(resource_id, client_id, quantity, contact)

    async def get_entry(self, entry_id: str) -> WaitingListEntry:
        """One waiting-list entry; raises :class:`NotFound` ``WAITING_LIST_ENTRY_NOT_FOUND``."""
        return await self.waiting_list.get(entry_id)

    async def leave_waiting_list(self, entry_id: str) -> WaitingListEntry:
        """See :meth:`WaitingList.leave`: → ``LEFT``; a held place goes to the next entry."""
        return await self.waiting_list.leave(entry_id)

    async def confirm_waiting_list(self, entry_id: str) -> Reservation:
        """See :meth:`WaitingList.confirm`: the held place becomes a CONFIRMED reservation."""
        return await self.waiting_list.confirm(entry_id)

    async def expire_due_holds(self, db: Database, limit: int) -> int:
        """Sweeper handler (see :meth:`WaitingList.expire_due_holds`): lapsed holds → EXPIRED."""
        return await self.waiting_list.expire_due_holds(db, limit)

    async def oldest_due_hold(self, session: AsyncSession, now: datetime) -> datetime | None:
        """The sweeper's lag probe: the earliest due ``hold_expires_at`` (UTC), or None."""
        return await self.waiting_list.oldest_due_hold(session, now)

    # -------------------------------------------------------------- reading

    async def timeline(
        self, resource_id: str, after_id: int = 0, limit: int = 1000
    ) -> list[events.EventRecord]:
        """The resource's history from the event log, oldest first: events of ``resource:<id>`` with id >
        ``after_id``, at most ``limit``. Raises :class:`NotFound` ``RESOURCE_NOT_FOUND``."""
        async with self.db.read() as session:
            await resource_or_404(session, resource_id)
            return await events.read(session, after_id=after_id, topics=[topic(resource_id)], limit=limit)

    async def audit_log(
        self, *, target_id: str | None = None, action: str | None = None, after_id: int = 0, limit: int = 100
    ) -> list[AuditEntry]:
        """Admin actions with id > ``after_id``, oldest first, at most ``limit``, optionally of one target
        or one action (``resource.create``, ``resource.resize``…)."""
        async with self.db.read() as session:
            query = select(AuditEntry).where(AuditEntry.id > after_id).order_by(AuditEntry.id).limit(limit)
            if target_id:
                query = query.where(AuditEntry.target_id == target_id)
            if action:
                query = query.where(AuditEntry.action == action)
            return list((await session.scalars(query)).all())

    async def iter_reservations(
        self, resource_id: str | None = None, batch: int = 1000
    ) -> AsyncIterator[list[Reservation]]:
        """Every reservation in (created_at, id) order, ``batch`` rows per read (keyset pagination)."""
        cursor: tuple[datetime, str] | None = None
        while True:
            async with self.db.read() as session:
                query = select(Reservation).order_by(Reservation.created_at, Reservation.id).limit(batch)
                if resource_id:
                    query = query.where(Reservation.resource_id == resource_id)
                if cursor:
                    query = query.where(
                        (Reservation.created_at > cursor[0])
                        | ((Reservation.created_at == cursor[0]) & (Reservation.id > cursor[1]))
                    )
                rows = list((await session.scalars(query)).all())
            if not rows:
                return
            yield rows
            cursor = (rows[-1].created_at, rows[-1].id)

    async def utilization(self) -> tuple[int, float | None]:
        """``(open resources, reserved / capacity over them)``; the ratio is None when their capacity is 0."""
        async with self.db.read() as session:
            count, reserved, capacity = (
                await session.execute(
                    select(func.count(), func.sum(Resource.reserved), func.sum(Resource.capacity)).where(
                        Resource.state == ResourceState.OPEN.value
                    )
                )
            ).one()
        return int(count or 0), (float(reserved) / float(capacity) if capacity else None)
