"""The assignment decision (seed 001 §4.4, §4.5), pure: no database, no framework.

Every combination of its three inputs (conversation exists or not; current agent online or None; next
available agent or None) is drawn by hypothesis, and the answer checked against the table of the seed:

==================  ==================  ==================  ==========================
exists              current online      next available      decision
==================  ==================  ==================  ==========================
True                agent               any                 KeepCurrentAgent(current)
True                None                agent               AssignNewAgent(next)
False               any                 agent               AssignNewAgent(next)
any (else)          any                 None                Pending
==================  ==================  ==================  ==========================
"""

from __future__ import annotations

import itertools
import typing

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dispatchd.dispatcher import assignment
from dispatchd.dispatcher.assignment import (
    AssignmentDecision,
    AssignNewAgent,
    KeepCurrentAgent,
    Pending,
    decide,
)

agent_ids = st.one_of(
    st.sampled_from(["agt_a", "agt_b"]),  # often equal, so "current == next" is drawn too
    st.text(min_size=1, max_size=40),
)
maybe_agent = st.none() | agent_ids


def expected(exists: bool, current: str | None, following: str | None) -> AssignmentDecision:
    if exists and current is not None:
        return KeepCurrentAgent(current)
    if following is not None:
        return AssignNewAgent(following)
    return Pending()


@given(exists=st.booleans(), current=maybe_agent, following=maybe_agent)
@example(exists=True, current="agt_a", following="agt_a")
@example(exists=True, current="agt_a", following="agt_b")
@example(exists=True, current="agt_a", following=None)
@example(exists=True, current=None, following="agt_b")
@example(exists=True, current=None, following=None)
@example(exists=False, current="agt_a", following="agt_b")
@example(exists=False, current="agt_a", following=None)
@example(exists=False, current=None, following="agt_b")
@example(exists=False, current=None, following=None)
def test_decide_follows_the_seed_table_for_every_combination(
    exists: bool, current: str | None, following: str | None
) -> None:
    decision = decide(exists, current, following)
    assert decision == expected(exists, current, following)
    assert isinstance(decision, typing.get_args(AssignmentDecision))


@given(exists=st.booleans(), current=maybe_agent, following=maybe_agent)
def test_decide_never_invents_an_agent_and_is_deterministic(
    exists: bool, current: str | None, following: str | None
) -> None:
    decision = decide(exists, current, following)
    assert decision == decide(exists, current, following)
    match decision:
        case KeepCurrentAgent(agent_id=agent_id):
            assert exists and agent_id == current
        case AssignNewAgent(agent_id=agent_id):
            assert agent_id == following
            assert not (exists and current is not None), "an existing conversation left its online agent"
        case Pending():
            assert following is None
            assert not (exists and current is not None), "an online agent's conversation became pending"
        case _:  # pragma: no cover - the union has three members
            pytest.fail(f"not an AssignmentDecision: {decision!r}")


@given(current=maybe_agent, following=maybe_agent)
def test_a_new_conversation_is_never_kept_by_a_current_agent(current: str | None, following: str | None):
    assert not isinstance(decide(False, current, following), KeepCurrentAgent)


@pytest.mark.parametrize(
    ("exists", "current", "following"),
    list(itertools.product([False, True], [None, "agt_cur"], [None, "agt_next"])),
)
def test_every_one_of_the_eight_shapes(exists: bool, current: str | None, following: str | None) -> None:
    """The 2 × 2 × 2 shapes spelled out, independent of what hypothesis draws."""
    assert decide(exists, current, following) == expected(exists, current, following)


def test_decisions_are_typed_frozen_values() -> None:
    assert typing.get_args(assignment.AssignmentDecision) == (KeepCurrentAgent, AssignNewAgent, Pending)
    keep = KeepCurrentAgent("agt_a")
    with pytest.raises(AttributeError):
        keep.agent_id = "agt_b"  # type: ignore[misc]
    assert KeepCurrentAgent("agt_a") != AssignNewAgent("agt_a")
    assert Pending() == Pending()


def test_decide_is_pure_and_needs_no_io() -> None:
    """The module imports nothing from the database, the framework or the orchestrator."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(assignment))
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "dataclasses"}, imported
