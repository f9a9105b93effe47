"""Replay the shipped pickup trace as customers writing to a business on WhatsApp
(``dispatchd replay-conversations``, issue 8 "Real traffic and speed"): :mod:`.plan` (pure: the
messages, their signed deliveries, the audit of assignments), :mod:`.summary` (options and the printed
summary), :mod:`.runner` (deliveries, simulated agents, the read-back)."""

from dispatchd.replay.conversations.plan import (
    PlannedMessage,
    assignment_violations,
    log_uniform,
    plan_messages,
    signed_delivery,
    text_webhook_payload,
)
from dispatchd.replay.conversations.runner import run_conversation_replay
from dispatchd.replay.conversations.summary import ConversationReplayOptions, ConversationReplaySummary

__all__ = [
    "ConversationReplayOptions",
    "ConversationReplaySummary",
    "PlannedMessage",
    "assignment_violations",
    "log_uniform",
    "plan_messages",
    "run_conversation_replay",
    "signed_delivery",
    "text_webhook_payload",
]
