"""The offer order of a broadcast (seed 000 §2.2 priorityMode, §3.1 "lastSeenAt DESC"), pure."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from dispatchd.matching.broadcast import Candidate, rank_candidates
from dispatchd.matching.models import PriorityMode

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def candidate(driver_id: str, distance_km: float | None = None, seen_s_ago: float = 0) -> Candidate:
    return Candidate(driver_id, f"+2217{driver_id[-4:]}", distance_km, T0 - timedelta(seconds=seen_s_ago))


def ids(candidates: list[Candidate]) -> list[str]:
    return [c.driver_id for c in candidates]


def test_distance_mode_puts_the_nearest_first_and_unknown_distances_last():
    found = [
        candidate("drv_0003", 4.2),
        candidate("drv_0001", None),
        candidate("drv_0002", 0.0),
        candidate("drv_0004", 1.5),
    ]
    assert ids(rank_candidates(found, PriorityMode.DISTANCE)) == [
        "drv_0002",
        "drv_0004",
        "drv_0003",
        "drv_0001",
    ]


def test_distance_ties_go_by_driver_id():
    found = [
        candidate("drv_b", 2.0),
        candidate("drv_c", None),
        candidate("drv_a", 2.0),
        candidate("drv_0", None),
    ]
    assert ids(rank_candidates(found, PriorityMode.DISTANCE)) == ["drv_a", "drv_b", "drv_0", "drv_c"]


def test_recent_activity_puts_the_most_recently_seen_first():
    found = [
        candidate("drv_a", seen_s_ago=60),
        candidate("drv_b", seen_s_ago=5),
        candidate("drv_c", seen_s_ago=600),
    ]
    assert ids(rank_candidates(found, PriorityMode.RECENT_ACTIVITY)) == ["drv_b", "drv_a", "drv_c"]


def test_recent_activity_ties_go_by_driver_id_descending_and_ignore_distance():
    found = [
        candidate("drv_a", 0.1, seen_s_ago=10),
        candidate("drv_c", 9.0, seen_s_ago=10),
        candidate("drv_b", None, seen_s_ago=10),
        candidate("drv_d", 0.0, seen_s_ago=11),
    ]
    assert ids(rank_candidates(found, PriorityMode.RECENT_ACTIVITY)) == ["drv_c", "drv_b", "drv_a", "drv_d"]


def test_nobody_to_rank():
    assert rank_candidates([], PriorityMode.DISTANCE) == []
    assert rank_candidates(iter(()), PriorityMode.RECENT_ACTIVITY) == []


def test_the_input_is_not_modified():
    found = [candidate("drv_b", 2.0), candidate("drv_a", 1.0)]
    ranked = rank_candidates(found, PriorityMode.DISTANCE)
    assert ids(found) == ["drv_b", "drv_a"] and ids(ranked) == ["drv_a", "drv_b"]


candidates = st.lists(
    st.builds(
        candidate,
        st.integers(0, 9999).map(lambda n: f"drv_{n:04d}"),
        st.none() | st.floats(0, 50, allow_nan=False),
        st.integers(0, 900),
    ),
    unique_by=lambda c: c.driver_id,
    max_size=30,
)


@given(candidates, st.sampled_from(PriorityMode), st.randoms(use_true_random=False))
def test_the_order_does_not_depend_on_the_order_found(found, mode, rnd: random.Random):
    shuffled = list(found)
    rnd.shuffle(shuffled)
    ranked = rank_candidates(found, mode)
    assert rank_candidates(shuffled, mode) == ranked
    assert sorted(ids(ranked)) == sorted(ids(found))
    for first, second in zip(ranked, ranked[1:], strict=False):
        if mode is PriorityMode.DISTANCE:
            assert first.distance_km is not None or second.distance_km is None
            if first.distance_km is not None and second.distance_km is not None:
                assert first.distance_km <= second.distance_km
        else:
            assert first.last_seen_at >= second.last_seen_at
