"""What the reservation engine's parts share (seed 003): its refusals, its settings, the shapes of a
commit's answer, and the helpers every unit of work uses (the server's clock, the resource's topic, the
audit trail, the get-or-404 readers, the "place disponible" messages).

Times are UTC ``datetime`` values from the unit of work's clock (``session.info["now"]``); durations are
seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from dispatchd.core import events, topics
from dispatchd.core.errors import Conflict
from dispatchd.core.logging import get_logger
from dispatchd.core.rows import get_or_404
from dispatchd.notifications import outbox
from dispatchd.notifications.outbox import Cancellation
from dispatchd.reservations import metrics
from dispatchd.reservations.models import AuditEntry, Reservation, Resource, WaitingListEntry

log = get_logger("dispatchd.reservations")


class ResourceFull(Conflict):
    """409 ``RESOURCE_FULL``: fewer free places than asked (seed 003 §1.4)."""

    code = "RESOURCE_FULL"
    title = "Resource full"


class ResourceClosed(Conflict):
    """409 ``RESOURCE_CLOSED``: the resource is not on sale (seed 003 §3, admin close)."""

    code = "RESOURCE_CLOSED"
    title = "Resource closed"


#: a :class:`CommitOutcome` refusal code → the problem+json error that answers it
REFUSALS: dict[str, type[Conflict]] = {"RESOURCE_FULL": ResourceFull, "RESOURCE_CLOSED": ResourceClosed}


@dataclass(frozen=True)
class ReservationsConfig:
    """``hold_s``: seconds a freed place stays held for the waiting-list entry it is offered to
    (``DISPATCHD_WAITING_LIST_HOLD_S``, 900 s = 15 min); ``max_quantity``: most places in one request;
    ``batch_max``: most reserve requests admitted in one transaction (``DISPATCHD_RESERVATION_BATCH_MAX``;
    1 commits each request alone)."""

    hold_s: float = 900.0
    max_quantity: int = 1000
    batch_max: int = 256


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


def now(session: AsyncSession) -> datetime:
    """The unit of work's server time (UTC), the one clock that orders reservations (seed 003
    "Timestamp Authority")."""
    return session.info["now"]


def topic(resource_id: str) -> str:
    """The resource's event-log topic, ``resource:<id>``."""
    return topics.resource(resource_id)


def touch(session: AsyncSession, resource_id: str) -> None:
    """Remember that this unit of work changed the resource (the availability cache forgets it at commit)."""
    session.info.setdefault("resources_touched", set()).add(resource_id)


def resource_snapshot(resource: Resource) -> dict[str, Any]:
    """The audited state of a resource: ``{"type", "name", "capacity", "reserved", "held", "state",
    "version", "metadata"}``."""
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
    """Record one admin action in the current unit of work (``actor`` is ``role:key id``, ``at`` the
    server time)."""
    session.add(
        AuditEntry(
            at=now(session),
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            before=before,
            after=after,
            detail=detail,
        )
    )


async def resource_or_404(session: AsyncSession, resource_id: str, *, lock: bool = False) -> Resource:
    """The resource, fresh (locked when ``lock``); raises :class:`~dispatchd.core.errors.NotFound`
    ``RESOURCE_NOT_FOUND``."""
    return await get_or_404(
        session, Resource, resource_id, code="RESOURCE_NOT_FOUND", what="resource", lock=lock
    )


async def reservation_or_404(session: AsyncSession, reservation_id: str) -> Reservation:
    """The reservation, fresh; raises :class:`~dispatchd.core.errors.NotFound` ``RESERVATION_NOT_FOUND``."""
    return await get_or_404(
        session, Reservation, reservation_id, code="RESERVATION_NOT_FOUND", what="reservation"
    )


async def entry_or_404(session: AsyncSession, entry_id: str) -> WaitingListEntry:
    """The waiting-list entry, fresh; raises :class:`~dispatchd.core.errors.NotFound`
    ``WAITING_LIST_ENTRY_NOT_FOUND``."""
    return await get_or_404(
        session, WaitingListEntry, entry_id, code="WAITING_LIST_ENTRY_NOT_FOUND", what="waiting list entry"
    )


def confirmed(
    session: AsyncSession,
    reservation: Reservation,
    reserved: int,
    held: int,
    capacity: int,
    version: int,
) -> None:
    """Append ``ReservationConfirmed`` (with the resource's counts and version after it), mark the resource
    touched and log the arbitration."""
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
    events.append(session, topic(reservation.resource_id), "ReservationConfirmed", data)
    touch(session, reservation.resource_id)
    log.info("arbitration", decision="CONFIRMED", resource_id=reservation.resource_id, **data)


def refusal(
    session: AsyncSession,
    resource_id: str,
    client_id: str,
    quantity: int,
    counts: tuple[str, int, int, int, int],
) -> tuple[str, str]:
    """Record a refused commit: ``counts`` is the resource's ``(state, reserved, held, capacity, version)``
    when it was refused. Appends ``ReservationRejected``, counts and logs it; returns ``(code, detail)``
    with code RESOURCE_CLOSED (not OPEN) or RESOURCE_FULL."""
    state, reserved, held, capacity, version = counts
    if state != "OPEN":
        code, detail = "RESOURCE_CLOSED", f"resource {resource_id} is closed"
    else:
        code, detail = "RESOURCE_FULL", f"{quantity} asked, {max(capacity - reserved - held, 0)} free"
    data = {
        "code": code,
        "client_id": client_id,
        "quantity": quantity,
        "reserved": reserved,
        "held": held,
        "capacity": capacity,
        "version": version,
        "at": now(session).isoformat(),
    }
    events.append(session, topic(resource_id), "ReservationRejected", data)
    metrics.REJECTIONS.labels(code).inc()
    log.info("arbitration", decision="REJECTED", resource_id=resource_id, **data)
    return code, detail


def entry_subject(entry_id: str) -> str:
    """The outbox subject of an entry's "place disponible" message, ``waiting_list:<entry id>``."""
    return f"waiting_list:{entry_id}"


async def cancel_place_offers(session: AsyncSession, entry_ids: list[str], reason: str) -> None:
    """The "place disponible" messages of these entries, if not yet sent, are moot: cancel them."""
    await outbox.cancel(
        session,
        [
            Cancellation(reason, ("waiting_list_offer",), subject=entry_subject(entry_id))
            for entry_id in entry_ids
        ],
    )
