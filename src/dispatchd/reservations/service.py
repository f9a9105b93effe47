"""Reservation engine (seed 003): capacity booked atomically, never overbooked, with a waiting list.

The commit is one conditional statement (DESIGN.md, idea 2; seed 003 "Atomic Commit")::

    UPDATE resources SET reserved = reserved + :q, version = version + 1
     WHERE id = :r AND state = 'OPEN' AND reserved + held + :q <= capacity

checked by ``rowcount`` — no read-then-write — and backed by a CHECK constraint
``reserved + held <= capacity``. The server's clock stamps every reservation (seed 003 "Timestamp
Authority"); every time is UTC.

:class:`ReservationService` is the one entry point the routers, the CLI, the sweeper and the benchmarks
use: resources and their admin operations (audited), the commit, cancellation and the reads live here;
the waiting list and its holds in :mod:`dispatchd.reservations.waiting_list`; what both share (refusals,
settings, outcome shapes, get-or-404 readers) in :mod:`dispatchd.reservations.common`.

Lock order, everywhere: resource → reservation / waiting-list entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, idempotency
from dispatchd.core.db import Database, lock_for_update, retry_transient
from dispatchd.core.errors import Conflict, DispatchdError, InvalidInput, InvalidState, NotFound
from dispatchd.core.ids import new_id
from dispatchd.reservations import metrics
from dispatchd.reservations.admission import Admission, AdmissionQueue
from dispatchd.reservations.common import (
    REFUSALS,
    CommitOutcome,
    Idempotency,
    ReservationsConfig,
    ResourceClosed,
    ResourceFull,
    audit,
    confirmed,
    log,
    now,
    refusal,
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


RESERVATION_COLUMNS = tuple(column.key for column in Reservation.__table__.columns)


@dataclass(frozen=True)
class StoredAnswer:
    """The stored first answer of a retried request, until its reservation is read (see ``_load_stored``)."""

    outcome: dict[str, Any]

    @property
    def confirmed(self) -> bool:
        return "reservation_id" in self.outcome


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
        #: the group commit's per-resource lanes (``config.batch_max`` requests per transaction at most)
        self.admissions = AdmissionQueue(self._admit, self.config.batch_max)

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
        """Seed 003 §1.4: book ``quantity`` places atomically, or refuse.

        Concurrent requests for one resource are admitted together (group commit, see
        :mod:`dispatchd.reservations.admission` and :meth:`_admit`); each gets the answer it would have
        got alone, in arrival order. Returns a :class:`CommitOutcome`; refusals (RESOURCE_FULL,
        RESOURCE_CLOSED) are outcomes, recorded as ReservationRejected events. Raises :class:`NotFound`
        (RESOURCE_NOT_FOUND) and :class:`InvalidInput` (quantity out of 1..max, IDEMPOTENCY_KEY_REUSED).
        """
        if not 1 <= quantity <= self.config.max_quantity:
            raise InvalidInput(f"quantity must be between 1 and {self.config.max_quantity}")
        if self.config.batch_max <= 1:
            return await self._reserve_alone(resource_id, client_id, quantity, idem)
        return await self.admissions.submit(resource_id, Admission(client_id, quantity, idem))

    async def _reserve_alone(
        self, resource_id: str, client_id: str, quantity: int, idem: Idempotency | None
    ) -> CommitOutcome:
        """One request in its own transaction: the reference the batches must equal, and their fallback."""
        try:
            return await self._reserve(resource_id, client_id, quantity, idem)
        except IntegrityError:
            if idem is None:
                raise
            # The same Idempotency-Key committed concurrently: answer what the first request got.
            async with self.db.read() as session:
                stored = await idempotency.recall(session, idem.scope, idem.fingerprint)
            return await self._replay(stored.outcome)

    async def _admit(self, resource_id: str, batch: list[Admission]) -> None:
        """Commit one batch of one resource and settle each admission. A batch whose transaction fails as
        a whole (a concurrent first use of one of its Idempotency-Keys in another process, a request the
        database refuses) is re-run one request at a time, so that one bad request never fails its
        neighbours."""
        metrics.BATCH_SIZE.observe(len(batch))
        try:
            outcomes = await self._admit_batch(resource_id, batch)
        except NotFound as missing:
            outcomes = [missing] * len(batch)
        except Exception:
            log.warning("reservation batch re-run one by one", resource_id=resource_id, size=len(batch))
            for admission in batch:
                try:
                    admission.settle(
                        await self._reserve_alone(
                            resource_id, admission.client_id, admission.quantity, admission.idem
                        )
                    )
                except Exception as error:
                    admission.settle(error)
            return
        for admission, outcome in zip(batch, outcomes, strict=True):
            admission.settle(outcome)

    @retry_transient
    async def _admit_batch(
        self, resource_id: str, batch: list[Admission]
    ) -> list[CommitOutcome | DispatchdError]:
        """One transaction for the whole batch: one locked read of the resource, each request decided in
        arrival order by the lone request's rule (``state`` OPEN and ``reserved + held + quantity ≤
        capacity``), one UPDATE of the resource, bulk INSERTs of the reservations, idempotency records
        and events, one COMMIT. Raises :class:`NotFound` ``RESOURCE_NOT_FOUND``."""
        with metrics.COMMIT_DURATION.time():
            async with self.db.transaction() as session:
                at = now(session)
                stored = await idempotency.recall_many(
                    session, [admission.idem.scope for admission in batch if admission.idem is not None]
                )
                locked = (
                    await session.execute(
                        lock_for_update(
                            select(
                                Resource.state,
                                Resource.reserved,
                                Resource.held,
                                Resource.capacity,
                                Resource.version,
                            ).where(Resource.id == resource_id)
                        )
                    )
                ).first()
                if locked is None:
                    raise NotFound(f"resource {resource_id} not found", code="RESOURCE_NOT_FOUND")
                state, reserved, held, capacity, version = locked
                first_version = version
                outcomes: list[CommitOutcome | DispatchdError | StoredAnswer] = []
                decided: dict[str, tuple[str, int]] = {}  # scope → (fingerprint, index of its outcome)
                reservations: list[Reservation] = []
                remembered: list[dict[str, Any]] = []
                for admission in batch:
                    idem = admission.idem
                    if idem is not None:
                        earlier = stored.get(idem.scope) or decided.get(idem.scope)
                        if earlier is not None:
                            outcomes.append(self._again(earlier, idem, outcomes))
                            continue
                    if state == ResourceState.OPEN and reserved + held + admission.quantity <= capacity:
                        reserved += admission.quantity
                        version += 1
                        reservation = Reservation(
                            id=new_id("rsv"),
                            resource_id=resource_id,
                            client_id=admission.client_id,
                            quantity=admission.quantity,
                            status=ReservationStatus.CONFIRMED.value,
                            waiting_list_entry_id=None,
                            created_at=at,
                            cancelled_at=None,
                        )
                        reservations.append(reservation)
                        confirmed(session, reservation, reserved, held, capacity, version)
                        outcome = CommitOutcome(reservation)
                        answer = (201, {"reservation_id": reservation.id})
                    else:
                        code, detail = refusal(
                            session,
                            resource_id,
                            admission.client_id,
                            admission.quantity,
                            (state, reserved, held, capacity, version),
                        )
                        outcome = CommitOutcome(None, code, detail)
                        answer = (409, {"refusal": code, "detail": detail})
                    if idem is not None:
                        decided[idem.scope] = (idem.fingerprint, len(outcomes))
                        remembered.append(
                            {
                                "scope": idem.scope,
                                "fingerprint": idem.fingerprint,
                                "status_code": answer[0],
                                "outcome": answer[1],
                                "created_at": at,
                            }
                        )
                    outcomes.append(outcome)
                if reservations:
                    changed = await session.execute(
                        update(Resource)
                        .where(Resource.id == resource_id, Resource.version == first_version)
                        .values(reserved=reserved, version=version, updated_at=at)
                    )
                    if changed.rowcount != 1:  # pragma: no cover - the row is locked (or SQLite serialised)
                        raise RuntimeError(f"resource {resource_id} changed under its lock")
                    await session.execute(
                        insert(Reservation),
                        [
                            {column: getattr(r, column) for column in RESERVATION_COLUMNS}
                            for r in reservations
                        ],
                    )
                if remembered:
                    await session.execute(insert(idempotency.IdempotentRequest), remembered)
                await self._load_stored(session, outcomes)
        metrics.RESERVATIONS.inc(len(reservations))
        return outcomes

    @staticmethod
    def _again(
        earlier: idempotency.IdempotentRequest | tuple[str, int],
        idem: Idempotency,
        outcomes: list[CommitOutcome | DispatchdError | StoredAnswer],
    ) -> CommitOutcome | DispatchdError | StoredAnswer:
        """A retry of a request answered before (stored, or earlier in this batch): its first answer,
        ``replayed``; IDEMPOTENCY_KEY_REUSED when the body differs."""
        if isinstance(earlier, tuple):
            fingerprint, index = earlier
            first = outcomes[index]
        else:
            fingerprint, first = earlier.fingerprint, earlier
        if fingerprint != idem.fingerprint:
            return InvalidInput(
                "this Idempotency-Key was used for a different request", code="IDEMPOTENCY_KEY_REUSED"
            )
        if isinstance(first, CommitOutcome):
            return replace(first, replayed=True)
        return StoredAnswer(first.outcome)

    async def _load_stored(
        self, session: AsyncSession, outcomes: list[CommitOutcome | DispatchdError | StoredAnswer]
    ) -> None:
        """Turn the stored answers of retried requests into outcomes (their reservations in one read)."""
        ids = [o.outcome["reservation_id"] for o in outcomes if isinstance(o, StoredAnswer) and o.confirmed]
        found = {}
        if ids:
            found = {
                r.id: r for r in await session.scalars(select(Reservation).where(Reservation.id.in_(ids)))
            }
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, StoredAnswer):
                stored = outcome.outcome
                outcomes[index] = (
                    CommitOutcome(found[stored["reservation_id"]], replayed=True)
                    if outcome.confirmed
                    else CommitOutcome(None, stored["refusal"], stored["detail"], replayed=True)
                )

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
                at = now(session)
                result = await session.execute(
                    update(Resource)
                    .where(
                        Resource.id == resource_id,
                        Resource.state == ResourceState.OPEN.value,
                        Resource.reserved + Resource.held + quantity <= Resource.capacity,
                    )
                    .values(
                        reserved=Resource.reserved + quantity, version=Resource.version + 1, updated_at=at
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
                    created_at=at,
                )
                session.add(reservation)
                confirmed(session, reservation, won.reserved, won.held, won.capacity, won.version)
                if idem is not None:
                    idempotency.remember(
                        session, idem.scope, idem.fingerprint, 201, {"reservation_id": reservation.id}
                    )
        metrics.RESERVATIONS.inc()
        return CommitOutcome(reservation)

    async def _refuse(
        self,
        session: AsyncSession,
        resource_id: str,
        client_id: str,
        quantity: int,
        idem: Idempotency | None,
    ) -> CommitOutcome:
        resource = await resource_or_404(session, resource_id)
        counts = (resource.state, resource.reserved, resource.held, resource.capacity, resource.version)
        code, detail = refusal(session, resource_id, client_id, quantity, counts)
        if idem is not None:
            idempotency.remember(
                session, idem.scope, idem.fingerprint, 409, {"refusal": code, "detail": detail}
            )
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
