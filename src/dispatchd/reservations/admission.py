"""Group commit (admission batching) for the reservation commit (issue 11, "Throughput").

A hot resource is one row: every commit on it waits for the one before to reach the disk, so one request
per commit caps it at the database's fsync rate. Instead, in each process, the reserve requests for one
resource that arrive while a commit is in flight wait behind it in arrival order; the next transaction
takes them all (at most ``batch_max``) and decides each with the same rule as a lone request, in that
order (see :mod:`dispatchd.reservations.commit`). Each request still gets its own answer.

The lanes are per resource and per process; processes (and instances) stay correct with each other
through the resource row's lock and the CHECK constraint, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Admission:
    """One reserve request waiting for its batch: who, how many places, its idempotency, and the future
    its caller awaits (a :class:`~dispatchd.reservations.common.CommitOutcome` or an exception)."""

    client_id: str
    quantity: int
    idem: Any
    answer: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, outcome: Any) -> None:
        """Answer the caller (an exception instance is raised to it); a caller that left is skipped."""
        if self.answer.done():
            return
        if isinstance(outcome, BaseException):
            self.answer.set_exception(outcome)
        else:
            self.answer.set_result(outcome)


#: Commits one batch of one resource, settling every admission (it must not raise).
CommitBatch = Callable[[str, list[Admission]], Awaitable[None]]


class AdmissionQueue:
    """Per-resource lanes of waiting :class:`Admission` s, each drained by one task at a time.

    ``submit`` enqueues and awaits; the lane's drain task (started by the first request, ended when the
    lane is empty) hands the waiting requests, oldest first, ``batch_max`` at a time, to ``commit``."""

    def __init__(self, commit: CommitBatch, batch_max: int) -> None:
        self._commit = commit
        self.batch_max = batch_max
        self._lanes: dict[str, list[Admission]] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}

    async def submit(self, resource_id: str, admission: Admission) -> Any:
        """Queue ``admission`` behind the commit in flight for ``resource_id``; return its outcome (or
        raise its error)."""
        self._lanes.setdefault(resource_id, []).append(admission)
        if resource_id not in self._drains:
            self._drains[resource_id] = asyncio.create_task(
                self._drain(resource_id), name=f"reservations-admission:{resource_id}"
            )
        return await admission.answer

    def waiting(self) -> int:
        """Requests queued behind a commit, over every resource."""
        return sum(len(lane) for lane in self._lanes.values())

    async def _drain(self, resource_id: str) -> None:
        lane = self._lanes[resource_id]
        try:
            while lane:
                batch = [admission for admission in lane[: self.batch_max] if not admission.answer.done()]
                del lane[: self.batch_max]
                if not batch:
                    continue
                try:
                    await self._commit(resource_id, batch)
                except Exception as error:  # a bug in the commit must not leave callers waiting forever
                    for admission in batch:
                        admission.settle(error)
        finally:
            # No await between the emptiness check and here: a request arriving later starts a new drain.
            self._drains.pop(resource_id, None)
            if not lane:
                self._lanes.pop(resource_id, None)
