"""The group commit's queue (issue 11), without a database: batches in arrival order, callers that left
are skipped, and a commit that raises answers its whole batch instead of leaving it waiting."""

from __future__ import annotations

import asyncio

import pytest

from dispatchd.reservations.admission import Admission, AdmissionQueue


async def test_requests_queued_behind_a_commit_form_the_next_batch_in_arrival_order():
    batches: list[list[str]] = []
    release = asyncio.Event()

    async def commit(resource_id: str, batch: list[Admission]) -> None:
        batches.append([a.client_id for a in batch])
        if len(batches) == 1:
            await release.wait()  # the first commit is in flight while the others arrive
        for admission in batch:
            admission.settle(f"{resource_id}:{admission.client_id}")

    queue = AdmissionQueue(commit, batch_max=3)
    first = asyncio.create_task(queue.submit("r", Admission("a", 1, None)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    others = [asyncio.create_task(queue.submit("r", Admission(c, 1, None))) for c in "bcdef"]
    await asyncio.sleep(0)
    assert queue.waiting() == 5
    release.set()
    assert await first == "r:a"
    assert [await task for task in others] == ["r:b", "r:c", "r:d", "r:e", "r:f"]
    assert batches == [["a"], ["b", "c", "d"], ["e", "f"]]
    assert queue.waiting() == 0


async def test_a_caller_that_left_before_its_batch_is_skipped():
    seen: list[str] = []
    release = asyncio.Event()

    async def commit(resource_id: str, batch: list[Admission]) -> None:
        seen.extend(a.client_id for a in batch)
        await release.wait()
        for admission in batch:
            admission.settle("ok")

    queue = AdmissionQueue(commit, batch_max=10)
    first = asyncio.create_task(queue.submit("r", Admission("a", 1, None)))
    await asyncio.sleep(0)
    leaving = asyncio.create_task(queue.submit("r", Admission("gone", 1, None)))
    staying = asyncio.create_task(queue.submit("r", Admission("c", 1, None)))
    await asyncio.sleep(0)
    leaving.cancel()
    release.set()
    assert (await first, await staying) == ("ok", "ok")
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert seen == ["a", "c"]


async def test_a_commit_that_raises_answers_every_request_of_its_batch_and_the_next_batch_runs():
    calls = 0

    async def commit(resource_id: str, batch: list[Admission]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug in the commit")
        for admission in batch:
            admission.settle("ok")

    queue = AdmissionQueue(commit, batch_max=10)
    failed = await asyncio.gather(
        queue.submit("r", Admission("a", 1, None)),
        queue.submit("r", Admission("b", 1, None)),
        return_exceptions=True,
    )
    assert [type(error) for error in failed] == [RuntimeError, RuntimeError]
    assert await queue.submit("r", Admission("c", 1, None)) == "ok"
