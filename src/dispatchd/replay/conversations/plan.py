"""The plan of a conversation replay (pure, no I/O): customers' messages from the trace, their signed
webhook deliveries, and the audit of assignment events."""

from __future__ import annotations

import json
import math
import random
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatchd.replay.trace import Trip
from dispatchd.replay.whatsapp import BUSINESS_DISPLAY_PHONE, SIGNATURE_HEADER, sign_webhook

FOLLOW_UPS = (1, 4)
FOLLOW_UP_GAP_MEDIAN_S = 40.0
FOLLOW_UP_GAP_SIGMA = 1.0
FOLLOW_UP_GAP_BOUNDS_S = (3.0, 600.0)
DEFAULT_REPLY_DELAY_S = (10.0, 180.0)
#: an agent closes a conversation answered and quiet this long (trace seconds)
WRAP_UP_S = 900.0
SHIFT_MEAN_S = 45 * 60.0
BREAK_MEAN_S = 8 * 60.0
HEARTBEAT_EVERY_S = 20.0  # real seconds (DISPATCHD_AGENT_PRESENCE_TIMEOUT_S defaults to 90)

_FIRST_WORDS = (
    "Bonjour, j'ai une question sur ma commande",
    "Hello, is my driver on the way?",
    "Bonsoir, je voudrais réserver pour demain",
    "Hi, I left my phone in the car",
    "Bonjour, combien pour aller à l'aéroport ?",
)
_FOLLOW_WORDS = ("Vous êtes là ?", "Merci", "Any news?", "C'est urgent", "OK", "Please answer", "?")
_SEND_CONCURRENCY = 64
_READ_CONCURRENCY = 8
_SEND_ATTEMPTS = 5
_TOPICS_PER_READ = 20
_STAT_TYPES = ("ConversationAssigned", "ConversationReassigned", "ConversationPending", "ConversationClosed")


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


@dataclass(frozen=True)
class PlannedMessage:
    """One customer message: ``due_s`` real seconds after the start, ``wa_id`` the customer's number
    without ``+``, ``tag`` a token written in the body that finds the message in the thread."""

    due_s: float
    customer: int
    wa_id: str
    wamid: str
    body: str
    tag: str
    first: bool


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    """A draw between ``low`` and ``high`` (> 0), uniform on a log scale (as many 10–20 s as 1–2 min)."""
    if low <= 0 or high < low:
        raise ValueError("need 0 < low <= high")
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def plan_messages(
    trips: Sequence[Trip], speed: float, rng: random.Random, run_tag: str
) -> list[PlannedMessage]:
    """Every trip a customer: a first message at the pickup's trace time, then 1–4 follow-ups, each
    :data:`FOLLOW_UP_GAP_MEDIAN_S` (lognormal, bounded) after the previous one. ``due_s`` is real seconds
    from the first pickup (trace seconds / ``speed``). ``run_tag`` (3 digits) keeps the customers of two
    runs against one database apart. Sorted by ``due_s``."""
    if not trips:
        return []
    first_at = trips[0].pickup_at
    low, high = FOLLOW_UP_GAP_BOUNDS_S
    messages: list[PlannedMessage] = []
    for customer, trip in enumerate(trips):
        wa_id = f"1555{run_tag}{customer:06d}"
        at = (trip.pickup_at - first_at).total_seconds()
        count = 1 + rng.randint(*FOLLOW_UPS)
        for number in range(count):
            if number:
                gap = rng.lognormvariate(math.log(FOLLOW_UP_GAP_MEDIAN_S), FOLLOW_UP_GAP_SIGMA)
                at += min(max(gap, low), high)
            tag = f"r{run_tag}c{customer}m{number}"
            words = rng.choice(_FIRST_WORDS if number == 0 else _FOLLOW_WORDS)
            messages.append(
                PlannedMessage(
                    due_s=at / speed,
                    customer=customer,
                    wa_id=wa_id,
                    wamid=f"wamid.replay.{run_tag}.{customer}.{number}.{secrets.token_hex(4)}",
                    body=f"{words} [{tag}]",
                    tag=tag,
                    first=number == 0,
                )
            )
    messages.sort(key=lambda message: (message.due_s, message.customer))
    return messages


def text_webhook_payload(
    *,
    from_wa_id: str,
    wamid: str,
    body: str,
    timestamp: int,
    phone_number_id: str = "0",
    display_phone_number: str = BUSINESS_DISPLAY_PHONE,
    profile_name: str = "Customer",
) -> dict[str, Any]:
    """A Meta webhook delivery of one text message from ``from_wa_id`` (digits, no ``+``), shaped like
    Meta's (``object`` → ``entry[]`` → ``changes[]`` → ``value`` with ``metadata``, ``contacts`` and one
    ``messages[]`` item of ``type`` ``text``); ``timestamp`` unix seconds."""
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": phone_number_id,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": display_phone_number,
                                "phone_number_id": phone_number_id,
                            },
                            "contacts": [{"profile": {"name": profile_name}, "wa_id": from_wa_id}],
                            "messages": [
                                {
                                    "from": from_wa_id,
                                    "id": wamid,
                                    "timestamp": str(timestamp),
                                    "type": "text",
                                    "text": {"body": body},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }


def signed_delivery(app_secret: str, payload: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The raw body and headers of a delivery signed as Meta signs it."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return body, {"Content-Type": "application/json", SIGNATURE_HEADER: sign_webhook(app_secret, body)}


@dataclass
class AssignmentAudit:
    """What :func:`assignment_violations` found: ``violations`` (conversation id, what), the assignments
    each agent received, and the most conversations each agent held at once."""

    violations: list[tuple[str, str]] = field(default_factory=list)
    assignments: Counter[str] = field(default_factory=Counter)
    peak_load: dict[str, int] = field(default_factory=dict)
    holders: dict[str, str | None] = field(default_factory=dict)


def assignment_violations(events: Iterable[Mapping[str, Any]]) -> AssignmentAudit:
    """Walk ``conversation:<id>`` events (``topic``, ``type``, ``data``) in id order and follow who holds
    each conversation. A violation is a ``ConversationAssigned`` while another agent holds it (two
    agents, no reassignment between), a ``ConversationReassigned`` whose ``previous_agent_id`` is not the
    holder, or a ``ConversationPending`` while an agent still holds it. Events of other types or topics
    are ignored. Pure."""
    audit = AssignmentAudit()
    load: Counter[str] = Counter()

    def hand(conversation: str, agent: str | None) -> None:
        previous = audit.holders.get(conversation)
        if previous is not None:
            load[previous] -= 1
        audit.holders[conversation] = agent
        if agent is not None:
            load[agent] += 1
            audit.assignments[agent] += 1
            audit.peak_load[agent] = max(audit.peak_load.get(agent, 0), load[agent])

    for event in events:
        topic = str(event.get("topic", ""))
        if not topic.startswith("conversation:"):
            continue
        conversation = topic.removeprefix("conversation:")
        type_, data = event.get("type"), event.get("data") or {}
        holder = audit.holders.get(conversation)
        if type_ == "ConversationAssigned":
            if holder is not None:
                audit.violations.append(
                    (conversation, f"assigned to {data.get('agent_id')} while {holder} holds it")
                )
            hand(conversation, data.get("agent_id"))
        elif type_ == "ConversationReassigned":
            if data.get("previous_agent_id") != holder:
                audit.violations.append(
                    (conversation, f"reassigned from {data.get('previous_agent_id')} but {holder} holds it")
                )
            hand(conversation, data.get("agent_id"))
        elif type_ == "ConversationPending":
            if holder is not None:
                audit.violations.append((conversation, f"pending while {holder} holds it"))
        elif type_ == "ConversationClosed":
            hand(conversation, None)
    return audit
