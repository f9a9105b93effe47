"""The reservation commit (seed 003 §1.4 "Atomic Commit"), with its group commit (issue 11).

A lone request is one conditional statement (DESIGN.md, idea 2)::

    UPDATE resources SET reserved = reserved + :q, version = version + 1
     WHERE id = :r AND state = 'OPEN' AND reserved + held + :q <= capacity

checked by its ``RETURNING`` row — no read-then-write — and backed by a CHECK constraint
``reserved + held <= capacity``. Concurrent requests for one resource are admitted together
(:mod:`dispatchd.reservations.admission`): one transaction reads the resource once under its row lock and
decides each request, in arrival order, by that same rule (:meth:`ReservationCommit._admit_batch`). The
server's clock stamps every reservation (seed 003 "Timestamp Authority"); every time is UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import idempotency
from dispatchd.core.db import Database, lock_for_update, retry_transient
from dispatchd.core.errors import DispatchdError, InvalidInput, NotFound
from dispatchd.core.ids import new_id
from dispatchd.reservations import metrics
from dispatchd.reservations.admission import Admission, AdmissionQueue
from dispatchd.reservations.common import (
    CommitOutcome,
    Idempotency,
    ReservationsConfig,
    confirmed,
    log,
    now,
    refusal,
    reservation_or_404,
    resource_or_404,
)
from dispatchd.reservations.models import Reservation, ReservationStatus, Resource, ResourceState

RESERVATION_COLUMNS = tuple(column.key for column in Reservation.__table__.columns)


@dataclass(frozen=True)
class StoredAnswer:
    """The stored first answer of a retried request, until its reservation is read (see ``_load_stored``)."""

    outcome: dict[str, Any]

    @property
    def confirmed(self) -> bool:
        return "reservation_id" in self.outcome


class ReservationCommit:
    """Books places or refuses them: :meth:`reserve` (group-committed) and :meth:`reserve_alone` (one
    request, one transaction: the reference a batch must equal, and its fallback)."""

    def __init__(self, db: Database, config: ReservationsConfig) -> None:
        self.db = db
        self.config = config
        #: the group commit's per-resource lanes (``config.batch_max`` requests per transaction at most)
        self.admissions = AdmissionQueue(self._admit, config.batch_max)

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
            return await self.reserve_alone(resource_id, client_id, quantity, idem)
        return await self.admissions.submit(resource_id, Admission(client_id, quantity, idem))

    async def reserve_alone(
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
                        await self.reserve_alone(
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
                async with self.db.read() as read:
                    reservation = await reservation_or_404(read, outcome["reservation_id"])
            return CommitOutcome(reservation, replayed=True)
        return CommitOutcome(None, outcome["refusal"], outcome["detail"], replayed=True)
