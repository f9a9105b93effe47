"""The waiting list of a sold-out resource and its holds (seed 003, as pretix does it).

Entries wait in strict server-timestamp order (``created_at``, then id). Capacity that frees (a cancel, a
resize up, a reopen, a hold that lapses, an entry that leaves) moves at once, in the same transaction, into
``held`` for the head of the list: the entry becomes ``OFFERED`` with ``hold_expires_at = now + hold_s``
(UTC; ``hold_s`` in seconds, 900 by default) and its ``contact`` is told through the outbox (category
``waiting_list_offer``). Held capacity is not sold to newcomers. Holds are deadlines in rows, expired by
the sweeper (:meth:`WaitingList.expire_due_holds`).

Entry statuses: ``WAITING`` → ``OFFERED`` → ``CONFIRMED`` (a reservation), or ``EXPIRED`` / ``LEFT``.

Lock order, everywhere: resource → waiting-list entries.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events
from dispatchd.core.db import Database, retry_transient
from dispatchd.core.errors import InvalidInput, InvalidState
from dispatchd.core.ids import new_id
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Message
from dispatchd.reservations import metrics
from dispatchd.reservations.common import (
    ReservationsConfig,
    ResourceClosed,
    cancel_place_offers,
    confirmed,
    entry_or_404,
    entry_subject,
    now,
    resource_or_404,
    topic,
    touch,
)
from dispatchd.reservations.models import (
    EntryStatus,
    Reservation,
    ReservationStatus,
    Resource,
    ResourceState,
    WaitingListEntry,
)


class WaitingList:
    """Join, leave, confirm; offer freed places to the head of the list; expire lapsed holds."""

    def __init__(self, db: Database, config: ReservationsConfig) -> None:
        self.db = db
        self.config = config

    @retry_transient
    async def join(
        self, resource_id: str, client_id: str, quantity: int, contact: str | None
    ) -> WaitingListEntry:
        """Queue ``quantity`` places for ``client_id`` on a sold-out OPEN resource; the server timestamp
        decides the order. Returns the entry, ``WAITING`` (or already ``OFFERED`` when places are free
        behind entries offered before it). Raises :class:`InvalidInput` (quantity out of 1..max),
        :class:`NotFound` ``RESOURCE_NOT_FOUND``, :class:`InvalidState` when the places are free now
        (reserve them), :class:`ResourceClosed` when closed."""
        if not 1 <= quantity <= self.config.max_quantity:
            raise InvalidInput(f"quantity must be between 1 and {self.config.max_quantity}")
        async with self.db.transaction() as session:
            resource = await resource_or_404(session, resource_id, lock=True)
            if resource.state != ResourceState.OPEN:
                raise ResourceClosed(f"resource {resource_id} is closed")
            waiting = await session.scalar(
                select(func.count())
                .select_from(WaitingListEntry)
                .where(
                    WaitingListEntry.resource_id == resource_id,
                    WaitingListEntry.status.in_([EntryStatus.WAITING.value, EntryStatus.OFFERED.value]),
                )
            )
            free = resource.capacity - resource.reserved - resource.held
            if not waiting and free >= quantity:
                raise InvalidState(
                    f"{free} places are free: reserve them instead of joining the waiting list"
                )
            entry = WaitingListEntry(
                id=new_id("wle"),
                resource_id=resource_id,
                client_id=client_id,
                contact=contact,
                quantity=quantity,
                status=EntryStatus.WAITING.value,
                created_at=now(session),
            )
            session.add(entry)
            await session.flush()
            events.append(
                session,
                topic(resource_id),
                "WaitingListJoined",
                {
                    "entry_id": entry.id,
                    "client_id": client_id,
                    "quantity": quantity,
                    "at": entry.created_at.isoformat(),
                },
            )
            # places may be free behind OFFERED entries: the queue, not a direct buyer, gets them
            await self.offer_freed_places(session, resource)
        return entry

    async def get(self, entry_id: str) -> WaitingListEntry:
        """One entry; raises :class:`NotFound` ``WAITING_LIST_ENTRY_NOT_FOUND``."""
        async with self.db.read() as session:
            return await entry_or_404(session, entry_id)

    @retry_transient
    async def leave(self, entry_id: str) -> WaitingListEntry:
        """Leave the list (→ ``LEFT``); a held place goes to the next entry. Raises :class:`NotFound`
        ``WAITING_LIST_ENTRY_NOT_FOUND``, :class:`InvalidState` once final."""
        async with self.db.transaction() as session:
            resource, entry = await self._lock_entry(session, entry_id)
            if entry.status not in (EntryStatus.WAITING, EntryStatus.OFFERED):
                raise InvalidState(f"waiting list entry {entry_id} is already {entry.status}")
            was_offered = entry.status == EntryStatus.OFFERED
            self._finish_entry(session, entry, EntryStatus.LEFT)
            if was_offered:
                resource.held -= entry.quantity
                await cancel_place_offers(session, [entry.id], "left the waiting list")
            resource.version += 1
            await session.flush()
            events.append(session, topic(resource.id), "WaitingListLeft", {"entry_id": entry.id})
            touch(session, resource.id)
            await self.offer_freed_places(session, resource)
        return entry

    @retry_transient
    async def confirm(self, entry_id: str) -> Reservation:
        """Turn a held place into a CONFIRMED reservation before ``hold_expires_at``. Raises
        :class:`NotFound` ``WAITING_LIST_ENTRY_NOT_FOUND``, :class:`InvalidState` (not OFFERED, or the
        hold lapsed), :class:`ResourceClosed`."""
        async with self.db.transaction() as session:
            at = now(session)
            resource, entry = await self._lock_entry(session, entry_id)
            if entry.status != EntryStatus.OFFERED or entry.hold_expires_at <= at:
                raise InvalidState(
                    f"waiting list entry {entry_id} has no place held for it (it is {entry.status})"
                )
            if resource.state != ResourceState.OPEN:
                raise ResourceClosed(f"resource {resource.id} is closed")
            reservation = Reservation(
                id=new_id("rsv"),
                resource_id=resource.id,
                client_id=entry.client_id,
                quantity=entry.quantity,
                status=ReservationStatus.CONFIRMED.value,
                waiting_list_entry_id=entry.id,
                created_at=at,
            )
            session.add(reservation)
            resource.held -= entry.quantity
            resource.reserved += entry.quantity
            resource.version += 1
            resource.updated_at = at
            entry.reservation_id = reservation.id
            self._finish_entry(session, entry, EntryStatus.CONFIRMED)
            await cancel_place_offers(session, [entry.id], "place confirmed")
            await session.flush()
            confirmed(
                session, reservation, resource.reserved, resource.held, resource.capacity, resource.version
            )
        metrics.RESERVATIONS.inc()
        return reservation

    def _finish_entry(self, session: AsyncSession, entry: WaitingListEntry, status: EntryStatus) -> None:
        entry.status = status.value
        entry.finished_at = now(session)
        entry.hold_expires_at = None

    async def _lock_entry(self, session: AsyncSession, entry_id: str) -> tuple[Resource, WaitingListEntry]:
        """The entry's resource, locked, then the entry read again under that lock (lock order)."""
        entry = await entry_or_404(session, entry_id)
        resource = await resource_or_404(session, entry.resource_id, lock=True)
        return resource, await entry_or_404(session, entry_id)

    async def offer_freed_places(self, session: AsyncSession, resource: Resource) -> int:
        """With the resource locked: hold free places for the head of the list, in strict order, and tell
        each offered client through the outbox. Returns how many entries were offered."""
        if resource.state != ResourceState.OPEN:
            return 0
        at = now(session)
        expires_at = at + timedelta(seconds=self.config.hold_s)
        offered = 0
        waiting = await session.scalars(
            select(WaitingListEntry)
            .where(
                WaitingListEntry.resource_id == resource.id,
                WaitingListEntry.status == EntryStatus.WAITING.value,
            )
            .order_by(WaitingListEntry.created_at, WaitingListEntry.id)
        )
        for entry in waiting.all():
            if entry.quantity > resource.capacity - resource.reserved - resource.held:
                break  # strict order: the head waits for enough places, nobody overtakes it
            entry.status = EntryStatus.OFFERED.value
            entry.offered_at = at
            entry.hold_expires_at = expires_at
            resource.held += entry.quantity
            offered += 1
            events.append(
                session,
                topic(resource.id),
                "WaitingListOffered",
                {
                    "entry_id": entry.id,
                    "client_id": entry.client_id,
                    "quantity": entry.quantity,
                    "hold_expires_at": expires_at.isoformat(),
                },
            )
            if entry.contact:
                await outbox.enqueue(
                    session,
                    [
                        Message(
                            recipient=entry.contact,
                            category="waiting_list_offer",
                            body=(
                                f"✅ *PLACE DISPONIBLE* — {resource.name}\n\n"
                                f"{entry.quantity} place(s) vous sont réservées jusqu'à "
                                f"{expires_at.strftime('%H:%M UTC')}. Confirmez avant pour la garder.\n"
                                f"Réf: {entry.id}"
                            ),
                            subject=entry_subject(entry.id),
                            expires_at=expires_at,
                        )
                    ],
                )
        if offered:
            resource.version += 1
            await session.flush()
            touch(session, resource.id)
        return offered

    @retry_transient
    async def expire_due_holds(self, db: Database, limit: int) -> int:
        """Sweeper handler: OFFERED entries past ``hold_expires_at`` → EXPIRED; the place goes to the next.
        Returns how many entries expired (over at most ``limit`` resources).

        Resources are locked first (``SKIP LOCKED``: another instance busy with one is left to it)."""
        async with db.transaction() as session:
            at = now(session)
            resource_ids = (
                await session.scalars(
                    select(WaitingListEntry.resource_id)
                    .where(
                        WaitingListEntry.status == EntryStatus.OFFERED.value,
                        WaitingListEntry.hold_expires_at <= at,
                    )
                    .distinct()
                    .limit(limit)
                )
            ).all()
            if not resource_ids:
                return 0
            resources = (
                await session.scalars(
                    select(Resource)
                    .where(Resource.id.in_(sorted(resource_ids)))
                    .order_by(Resource.id)
                    .with_for_update(skip_locked=True, key_share=True)
                    .execution_options(populate_existing=True)
                )
            ).all()
            expired = 0
            for resource in resources:
                lapsed = (
                    await session.scalars(
                        select(WaitingListEntry).where(
                            WaitingListEntry.resource_id == resource.id,
                            WaitingListEntry.status == EntryStatus.OFFERED.value,
                            WaitingListEntry.hold_expires_at <= at,
                        )
                    )
                ).all()
                await cancel_place_offers(session, [entry.id for entry in lapsed], "hold lapsed")
                for entry in lapsed:
                    self._finish_entry(session, entry, EntryStatus.EXPIRED)
                    resource.held -= entry.quantity
                    events.append(
                        session, topic(resource.id), "WaitingListHoldExpired", {"entry_id": entry.id}
                    )
                expired += len(lapsed)
                resource.version += 1
                await session.flush()
                touch(session, resource.id)
                await self.offer_freed_places(session, resource)
            return expired

    async def oldest_due_hold(self, session: AsyncSession, now: datetime) -> datetime | None:
        """The sweeper's lag probe: the earliest ``hold_expires_at`` (UTC) of an OFFERED entry already due
        at ``now``, or None."""
        return await session.scalar(
            select(func.min(WaitingListEntry.hold_expires_at)).where(
                WaitingListEntry.status == EntryStatus.OFFERED.value, WaitingListEntry.hold_expires_at <= now
            )
        )
