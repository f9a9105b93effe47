"""The assignment decision (seed 001 §4.4, §4.5): pure, no I/O, no framework.

Given whether the conversation exists, its current agent when that agent is online, and the next agent
of the rotation with room, :func:`decide` says what to do. The orchestrator applies it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeepCurrentAgent:
    agent_id: str


@dataclass(frozen=True)
class AssignNewAgent:
    agent_id: str


@dataclass(frozen=True)
class Pending:
    pass


#: Seed 001 §4.5 ``AssignmentDecision``.
AssignmentDecision = KeepCurrentAgent | AssignNewAgent | Pending


def decide(
    conversation_exists: bool, current_agent_online: str | None, next_available_agent: str | None
) -> AssignmentDecision:
    """``current_agent_online`` is the conversation's agent id when that agent is ONLINE, else None;
    ``next_available_agent`` the next agent of the rotation with spare capacity, else None.

    An existing conversation stays with its online agent; otherwise the next agent takes it; with
    nobody, it is pending. A new conversation has no current agent."""
    if conversation_exists and current_agent_online is not None:
        return KeepCurrentAgent(current_agent_online)
    if next_available_agent is not None:
        return AssignNewAgent(next_available_agent)
    return Pending()
