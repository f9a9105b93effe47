"""Reservation engine (seed 003): capacity booked atomically, never overbooked, with a waiting list.

The commit is one conditional statement (DESIGN.md, idea 2; seed 003 "Atomic Commit")::

    UPDATE resources SET reserved = reserved + :q, version = version + 1
     WHERE id = :r AND state = 'OPEN' AND reserved + held + :q <= capacity

checked by ``rowcount`` — no read-then-write — and backed by a CHECK constraint
``reserved + held <= capacity``. The server's clock stamps every reservation (seed 003 "Timestamp
Authority").

Waiting list (as pretix does it): entries wait in strict server-timestamp order; capacity that frees
(cancel, resize up, reopen, a hold that lapses) moves at once, in the same transaction, into ``held``
for the head of the list, who is told through the outbox and has ``hold_s`` seconds to confirm. Held
capacity is not sold to newcomers. Holds are deadlines in rows (``hold_expires_at``), handled by the
sweeper.

Lock order, everywhere: resource → reservation / waiting-list entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, idempotency
from dispatchd.core.db import Database, lock_for_update, retry_transient
from dispatchd.core.errors import Conflict, InvalidInput, InvalidState, NotFound
from dispatchd.core.ids import new_id
from dispatchd.core.logging import get_logger
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Cancellation, Message
from dispatchd.reservations import metrics
from dispatchd.reservations.models import (
    AuditEntry,
    EntryStatus,
    Reservation,
    ReservationStatus,
    Resource,
    ResourceState,
    WaitingListEntry,
)

log = get_logger("dispatchd.reservations")


class ResourceFull(Conflict):
    code = "RESOURCE_FULL"
    title = "Resource full"


class ResourceClosed(Conflict):
    code = "RESOURCE_CLOSED"
    title = "Resource closed"


REFUSALS: dict[str, type[Conflict]] = {"RESOURCE_FULL": ResourceFull, "RESOURCE_CLOSED": ResourceClosed}


@dataclass(frozen=True)
class ReservationsConfig:
    hold_s: float = 900.0
    max_quantity: int = 1000


@dataclass(frozen=True)
class Idempotency:
    """``scope`` = API key id + the client's Idempotency-Key; ``fingerprint`` of the request body."""

    scope: str
    fingerprint: str


@dataclass(frozen=True)
class CommitOutcome:
    """``reservation`` when CONFIRMED, else ``refusal`` (RESOURCE_FULL / RESOURCE_CLOSED) and ``detail``;
    ``replayed`` when it is the stored first answer to a retried request."""

    reservation: Reservation | None
    refusal: str | None = None
    detail: str = ""
    replayed: bool = False


def _now(session: AsyncSession) -> datetime:
    return session.info["now"]


def _topic(resource_id: str) -> str:
    return f"resource:{resource_id}"


def _touch(session: AsyncSession, resource_id: str) -> None:
    """Remember that this unit of work changed the resource (the availability cache forgets it at commit)."""
    session.info.setdefault("resources_touched", set()).add(resource_id)


def resource_snapshot(resource: Resource) -> dict[str, Any]:
    return {
        "type": resource.type,
        "name": resource.name,
        "capacity": resource.capacity,
        "reserved": resource.reserved,
        "held": resource.held,
        "state": resource.state,
        "version": resource.version,
        "metadata": resource.metadata_,
    }


def audit(
    session: AsyncSession,
    actor: str,
    action: str,
    target_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    *,
    target_type: str = "resource",
    detail: str | None = None,
) -> None:
    """Record one admin action in the current unit of work."""
    session.add(
        AuditEntry(
            at=_now(session),
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            before=before,
            after=after,
            detail=detail,
        )
    )


class ReservationService:
    """Seed 003 ReservationCommitService plus admin operations and the waiting list."""

    def __init__(self, db: Database, config: ReservationsConfig | None = None) -> None:
        self.db = db
        self.config = config or ReservationsConfig()

    # -------------------------------------------------------------- resources

    @retry_transient
    async def create_resource(self, data: dict[str, Any], actor: str) -> Resource:
        """Create an OPEN resource (``data``: type, name, capacity ≥ 0, metadata). Audited."""
        async with self.db.transaction() as session:
            resource = self._new_resource(session, data)
            session.add(resource)
            await session.flush()
            audit(session, actor, "resource.create", resource.id, None, resource_snapshot(resource))
            events.append(session, _topic(resource.id), "ResourceCreated", resource_snapshot(resource))
        return resource

    def _new_resource(self, session: AsyncSession, data: dict[str, Any]) -> Resource:
        now = _now(session)
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
            created_at=now,
            updated_at=now,
        )

    async def import_resources(self, rows: list[dict[str, Any]], actor: str) -> list[Resource]:
        """Create every resource of ``rows`` in one transaction: all or nothing. Raises :class:`Conflict`
        when an id already exists."""
        try:
            async with self.db.transaction() as session:
                created = [self._new_resource(session, row) for row in rows]
                session.add_all(created)
                await session.flush()
                for resource in created:
                    audit(session, actor, "resource.import", resource.id, None, resource_snapshot(resource))
                    events.append(
                        session, _topic(resource.id), "ResourceCreated", resource_snapshot(resource)
                    )
        except IntegrityError:
            raise Conflict("a resource id in the file already exists; nothing was imported") from None
        return created

    async def get_resource(self, resource_id: str) -> Resource:
        async with self.db.read() as session:
            return await self._resource_or_404(session, resource_id)

    @retry_transient
    async def set_capacity(self, resource_id: str, capacity: int, actor: str) -> Resource:
        """Resize. Below what is reserved or held → :class:`InvalidState`; a larger capacity is offered to
        the waiting list first. Audited."""
        async with self.db.transaction() as session:
            resource = await self._resource_or_404(session, resource_id, lock=True)
            before = resource_snapshot(resource)
            if capacity < resource.reserved + resource.held:
                raise InvalidState(
                    f"capacity {capacity} is below the {resource.reserved} places reserved"
                    f" and {resource.held} held for the waiting list"
                )
            resource.capacity = capacity
            await self._changed(session, resource, "ResourceResized", actor, "resource.resize", before)
            await self._offer_freed_places(session, resource)
        return resource

    async def close(self, resource_id: str, actor: str) -> Resource:
        """Stop selling (commits answer RESOURCE_CLOSED); reservations stay. Audited."""
        return await self._set_state(resource_id, ResourceState.CLOSED, actor)

    async def reopen(self, resource_id: str, actor: str) -> Resource:
        """Sell again; free places go to the waiting list first. Audited."""
        return await self._set_state(resource_id, ResourceState.OPEN, actor)

    @retry_transient
    async def _set_state(self, resource_id: str, state: ResourceState, actor: str) -> Resource:
        async with self.db.transaction() as session:
            resource = await self._resource_or_404(session, resource_id, lock=True)
            if resource.state == state:
                raise InvalidState(f"resource {resource_id} is already {state}")
            before = resource_snapshot(resource)
            resource.state = state.value
            kind = "ResourceReopened" if state is ResourceState.OPEN else "ResourceClosed"
            await self._changed(session, resource, kind, actor, f"resource.{kind[8:].lower()}", before)
            if state is ResourceState.OPEN:
                await self._offer_freed_places(session, resource)
        return resource

    async def _changed(
        self, session: AsyncSession, resource: Resource, kind: str, actor: str, action: str, before: dict
    ) -> None:
        resource.version += 1
        resource.updated_at = _now(session)
        await session.flush()
        after = resource_snapshot(resource)
        audit(session, actor, action, resource.id, before, after)
        events.append(session, _topic(resource.id), kind, {**after, "actor": actor})
        _touch(session, resource.id)

    # ------------------------------------------------------------ the commit

    async def reserve(
        self, resource_id: str, client_id: str, quantity: int, idem: Idempotency | None = None
    ) -> CommitOutcome:
        """Seed 003 §1.4: book ``quantity`` places atomically, or refuse.

        Returns a :class:`CommitOutcome`; refusals (RESOURCE_FULL, RESOURCE_CLOSED) are outcomes, recorded
        as ReservationRejected events. Raises :class:`NotFound` (NOT_FOUND) and
        :class:`InvalidInput` (quantity out of 1..max, IDEMPOTENCY_KEY_REUSED).
        """
        if not 1 <= quantity <= self.config.max_quantity:
            raise InvalidInput(f"quantity must be between 1 and {self.config.max_quantity}")
        try:
            return await self._reserve(resource_id, client_id, quantity, idem)
        except IntegrityError:
            if idem is None:
                raise
            # The same Idempotency-Key committed concurrently: answer what the first request got.
            async with self.db.read() as session:
                stored = await idempotency.recall(session, idem.scope, idem.fingerprint)
            return await self._replay(stored.outcome)

    @retry_transient
    async def _reserve(
        self, resource_id: str, client_id: str, quantity: int, idem: Idempotency | None
    ) -> CommitOutcome:
        with metrics.COMMIT_DURATION.time():
            async with self.db.transaction() as session:
                if idem is not None:
                    stored = await idempotency.recall(session, idem.scope, idem.fingerprint)
                    if stored is not None:
                        return await self._replay(stored.outcome, session)
                now = _now(session)
                result = await session.execute(
                    update(Resource)
                    .where(
                        Resource.id == resource_id,
                        Resource.state == ResourceState.OPEN.value,
                        Resource.reserved + Resource.held + quantity <= Resource.capacity,
                    )
                    .values(
                        reserved=Resource.reserved + quantity, version=Resource.version + 1, updated_at=now
                    )
                    .returning(Resource.reserved, Resource.held, Resource.capacity, Resource.version)
                )
                won = result.first()
                if won is None:
                    return await self._refuse(session, resource_id, client_id, quantity, idem)
                reservation = Reservation(
                    id=new_id("rsv"),
                    resource_id=resource_id,
                    client_id=client_id,
                    quantity=quantity,
                    status=ReservationStatus.CONFIRMED.value,
                    created_at=now,
                )
                session.add(reservation)
                self._confirmed(session, reservation, won.reserved, won.held, won.capacity, won.version)
                if idem is not None:
                    idempotency.remember(
                        session, idem.scope, idem.fingerprint, 201, {"reservation_id": reservation.id}
                    )
        metrics.RESERVATIONS.inc()
        return CommitOutcome(reservation)

    def _confirmed(
        self,
        session: AsyncSession,
        reservation: Reservation,
        reserved: int,
        held: int,
        capacity: int,
        version: int,
    ) -> None:
        data = {
            "reservation_id": reservation.id,
            "client_id": reservation.client_id,
            "quantity": reservation.quantity,
            "reserved": reserved,
            "held": held,
            "capacity": capacity,
            "version": version,
            "at": reservation.created_at.isoformat(),
        }
        if reservation.waiting_list_entry_id:
            data["waiting_list_entry_id"] = reservation.waiting_list_entry_id
        events.append(session, _topic(reservation.resource_id), "ReservationConfirmed", data)
        _touch(session, reservation.resource_id)
        log.info("arbitration", decision="CONFIRMED", resource_id=reservation.resource_id, **data)

    async def _refuse(
        self,
        session: AsyncSession,
        resource_id: str,
        client_id: str,
        quantity: int,
        idem: Idempotency | None,
    ) -> CommitOutcome:
        resource = await session.get(Resource, resource_id)
        if resource is None:
            raise NotFound(f"resource {resource_id} not found")
        if resource.state != ResourceState.OPEN:
            code, detail = "RESOURCE_CLOSED", f"resource {resource_id} is closed"
        else:
            free = resource.capacity - resource.reserved - resource.held
            code, detail = "RESOURCE_FULL", f"{quantity} asked, {max(free, 0)} free"
        data = {
            "code": code,
            "client_id": client_id,
            "quantity": quantity,
            "reserved": resource.reserved,
            "held": resource.held,
            "capacity": resource.capacity,
            "version": resource.version,
            "at": _now(session).isoformat(),
        }
        events.append(session, _topic(resource_id), "ReservationRejected", data)
        if idem is not None:
            idempotency.remember(
                session, idem.scope, idem.fingerprint, 409, {"refusal": code, "detail": detail}
            )
        metrics.REJECTIONS.labels(code).inc()
        log.info("arbitration", decision="REJECTED", resource_id=resource_id, **data)
        return CommitOutcome(None, code, detail)

    async def _replay(self, outcome: dict[str, Any], session: AsyncSession | None = None) -> CommitOutcome:
        if "reservation_id" in outcome:
            if session is not None:
                reservation = await session.get(Reservation, outcome["reservation_id"])
            else:
                reservation = await self.get_reservation(outcome["reservation_id"])
            return CommitOutcome(reservation, replayed=True)
        return CommitOutcome(None, outcome["refusal"], outcome["detail"], replayed=True)

    async def get_reservation(self, reservation_id: str) -> Reservation:
        return await self._read(Reservation, reservation_id, "reservation")

    @retry_transient
    async def cancel(self, reservation_id: str) -> Reservation:
        """Cancel a CONFIRMED reservation; its places go to the waiting list first. Raises
        :class:`NotFound`, :class:`InvalidState` (already cancelled)."""
        async with self.db.transaction() as session:
            now = _now(session)
            found = await session.scalar(
                select(Reservation.resource_id).where(Reservation.id == reservation_id)
            )
            if found is None:
                raise NotFound(f"reservation {reservation_id} not found")
            resource = await self._resource_or_404(session, found, lock=True)
            reservation = await session.get(Reservation, reservation_id, populate_existing=True)
            if reservation.status != ReservationStatus.CONFIRMED:
                raise InvalidState(f"reservation {reservation_id} is already {reservation.status}")
            reservation.status = ReservationStatus.CANCELLED.value
            reservation.cancelled_at = now
            resource.reserved -= reservation.quantity
            resource.version += 1
            resource.updated_at = now
            await session.flush()
            events.append(
                session,
                _topic(resource.id),
                "ReservationCancelled",
                {
                    "reservation_id": reservation.id,
                    "client_id": reservation.client_id,
                    "quantity": reservation.quantity,
                    "reserved": resource.reserved,
                    "held": resource.held,
                    "capacity": resource.capacity,
                    "version": resource.version,
                    "at": now.isoformat(),
                },
            )
            _touch(session, resource.id)
            await self._offer_freed_places(session, resource)
        return reservation

    # ----------------------------------------------------------- waiting list

    @retry_transient
    async def join_waiting_list(
        self, resource_id: str, client_id: str, quantity: int, contact: str | None
    ) -> WaitingListEntry:
        """Queue for a sold-out OPEN resource (server timestamp decides the order). Raises
        :class:`InvalidState` when the places are free now (reserve them), ResourceClosed when closed."""
        if not 1 <= quantity <= self.config.max_quantity:
            raise InvalidInput(f"quantity must be between 1 and {self.config.max_quantity}")
        async with self.db.transaction() as session:
            resource = await self._resource_or_404(session, resource_id, lock=True)
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
                created_at=_now(session),
            )
            session.add(entry)
            await session.flush()
            events.append(
                session,
                _topic(resource_id),
                "WaitingListJoined",
                {
                    "entry_id": entry.id,
                    "client_id": client_id,
                    "quantity": quantity,
                    "at": entry.created_at.isoformat(),
                },
            )
            # places may be free behind OFFERED entries: the queue, not a direct buyer, gets them
            await self._offer_freed_places(session, resource)
        return entry

    async def get_entry(self, entry_id: str) -> WaitingListEntry:
        return await self._read(WaitingListEntry, entry_id, "waiting list entry")

    async def _read(self, model: type, row_id: str, label: str):
        """One row by primary key, or :class:`NotFound` (NOT_FOUND) naming it."""
        async with self.db.read() as session:
            row = await session.get(model, row_id)
        if row is None:
            raise NotFound(f"{label} {row_id} not found")
        return row

    @retry_transient
    async def leave_waiting_list(self, entry_id: str) -> WaitingListEntry:
        """Leave the list; a held place goes to the next entry. Raises :class:`InvalidState` once final."""
        async with self.db.transaction() as session:
            resource, entry = await self._lock_entry(session, entry_id)
            if entry.status not in (EntryStatus.WAITING, EntryStatus.OFFERED):
                raise InvalidState(f"waiting list entry {entry_id} is already {entry.status}")
            was_offered = entry.status == EntryStatus.OFFERED
            self._finish_entry(session, entry, EntryStatus.LEFT)
            if was_offered:
                resource.held -= entry.quantity
                await _cancel_place_offers(session, [entry.id], "left the waiting list")
            resource.version += 1
            await session.flush()
            events.append(session, _topic(resource.id), "WaitingListLeft", {"entry_id": entry.id})
            _touch(session, resource.id)
            await self._offer_freed_places(session, resource)
        return entry

    @retry_transient
    async def confirm_waiting_list(self, entry_id: str) -> Reservation:
        """Turn a held place into a reservation before ``hold_expires_at``. Raises :class:`InvalidState`
        (not OFFERED, or the hold lapsed), ResourceClosed."""
        async with self.db.transaction() as session:
            now = _now(session)
            resource, entry = await self._lock_entry(session, entry_id)
            if entry.status != EntryStatus.OFFERED or entry.hold_expires_at <= now:
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
                created_at=now,
            )
            session.add(reservation)
            resource.held -= entry.quantity
            resource.reserved += entry.quantity
            resource.version += 1
            resource.updated_at = now
            entry.reservation_id = reservation.id
            self._finish_entry(session, entry, EntryStatus.CONFIRMED)
            await _cancel_place_offers(session, [entry.id], "place confirmed")
            await session.flush()
            self._confirmed(
                session, reservation, resource.reserved, resource.held, resource.capacity, resource.version
            )
        metrics.RESERVATIONS.inc()
        return reservation

    def _finish_entry(self, session: AsyncSession, entry: WaitingListEntry, status: EntryStatus) -> None:
        entry.status = status.value
        entry.finished_at = _now(session)
        entry.hold_expires_at = None

    async def _lock_entry(self, session: AsyncSession, entry_id: str) -> tuple[Resource, WaitingListEntry]:
        resource_id = await session.scalar(
            select(WaitingListEntry.resource_id).where(WaitingListEntry.id == entry_id)
        )
        if resource_id is None:
            raise NotFound(f"waiting list entry {entry_id} not found")
        resource = await self._resource_or_404(session, resource_id, lock=True)
        entry = await session.get(WaitingListEntry, entry_id, populate_existing=True)
        return resource, entry

    async def _offer_freed_places(self, session: AsyncSession, resource: Resource) -> int:
        """With the resource locked: hold free places for the head of the list, in strict order, and tell
        each offered client through the outbox. Returns how many entries were offered."""
        if resource.state != ResourceState.OPEN:
            return 0
        now = _now(session)
        expires_at = now + timedelta(seconds=self.config.hold_s)
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
            entry.offered_at = now
            entry.hold_expires_at = expires_at
            resource.held += entry.quantity
            offered += 1
            events.append(
                session,
                _topic(resource.id),
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
                            subject=_entry_subject(entry.id),
                            expires_at=expires_at,
                        )
                    ],
                )
        if offered:
            resource.version += 1
            await session.flush()
            _touch(session, resource.id)
        return offered

    @retry_transient
    async def expire_due_holds(self, db: Database, limit: int) -> int:
        """Sweeper handler: OFFERED entries past ``hold_expires_at`` → EXPIRED; the place goes to the next.

        Resources are locked first (``SKIP LOCKED``: another instance busy with one is left to it)."""
        async with db.transaction() as session:
            now = _now(session)
            resource_ids = (
                await session.scalars(
                    select(WaitingListEntry.resource_id)
                    .where(
                        WaitingListEntry.status == EntryStatus.OFFERED.value,
                        WaitingListEntry.hold_expires_at <= now,
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
                            WaitingListEntry.hold_expires_at <= now,
                        )
                    )
                ).all()
                await _cancel_place_offers(session, [entry.id for entry in lapsed], "hold lapsed")
                for entry in lapsed:
                    self._finish_entry(session, entry, EntryStatus.EXPIRED)
                    resource.held -= entry.quantity
                    events.append(
                        session, _topic(resource.id), "WaitingListHoldExpired", {"entry_id": entry.id}
                    )
                expired += len(lapsed)
                resource.version += 1
                await session.flush()
                _touch(session, resource.id)
                await self._offer_freed_places(session, resource)
            return expired

    async def oldest_due_hold(self, session: AsyncSession, now: datetime) -> datetime | None:
        return await session.scalar(
            select(func.min(WaitingListEntry.hold_expires_at)).where(
                WaitingListEntry.status == EntryStatus.OFFERED.value, WaitingListEntry.hold_expires_at <= now
            )
        )

    # -------------------------------------------------------------- reading

    async def timeline(
        self, resource_id: str, after_id: int = 0, limit: int = 1000
    ) -> list[events.EventRecord]:
        """The resource's history from the event log, oldest first."""
        async with self.db.read() as session:
            await self._resource_or_404(session, resource_id)
            return await events.read(session, after_id=after_id, topics=[_topic(resource_id)], limit=limit)

    async def audit_log(
        self, *, target_id: str | None = None, action: str | None = None, after_id: int = 0, limit: int = 100
    ) -> list[AuditEntry]:
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
        """``(open resources, reserved / capacity over them)``."""
        async with self.db.read() as session:
            count, reserved, capacity = (
                await session.execute(
                    select(func.count(), func.sum(Resource.reserved), func.sum(Resource.capacity)).where(
                        Resource.state == ResourceState.OPEN.value
                    )
                )
            ).one()
        return int(count or 0), (float(reserved) / float(capacity) if capacity else None)

    async def _resource_or_404(
        self, session: AsyncSession, resource_id: str, *, lock: bool = False
    ) -> Resource:
        query = select(Resource).where(Resource.id == resource_id).execution_options(populate_existing=True)
        if lock:
            query = lock_for_update(query)
        resource = await session.scalar(query)
        if resource is None:
            raise NotFound(f"resource {resource_id} not found")
        return resource


def _entry_subject(entry_id: str) -> str:
    return f"waiting_list:{entry_id}"


async def _cancel_place_offers(session: AsyncSession, entry_ids: list[str], reason: str) -> None:
    """The "place disponible" messages of these entries, if not yet sent, are moot: cancel them."""
    await outbox.cancel(
        session,
        [
            Cancellation(reason, ("waiting_list_offer",), subject=_entry_subject(entry_id))
            for entry_id in entry_ids
        ],
    )
