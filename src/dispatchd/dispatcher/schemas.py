"""Request and response bodies of the dispatcher API (seed 001), snake_case. Every input is bounded:
names and emails 200 characters, message bodies 4,096, ids 40."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt

from dispatchd.core.phone import E164_PATTERN, is_e164
from dispatchd.core.schemas import StrictModel
from dispatchd.dispatcher.models import ConversationStatus, Direction, Presence

#: the longest message body accepted (an agent's reply, a customer message from another channel);
#: WhatsApp's own text limit is 4,096 characters
BODY_MAX = 4096
ID_MAX = 40
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _check_phone(value: str) -> str:
    if not is_e164(value):
        raise ValueError("must be an E.164 number such as +221771234567")
    return value


def _check_email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("must be an email address such as awa@example.com")
    return value


Phone = Annotated[
    str,
    Field(
        max_length=16,
        description="E.164",
        examples=["+221771234567"],
        json_schema_extra={"pattern": E164_PATTERN},
    ),
    AfterValidator(_check_phone),
]
Email = Annotated[str, Field(max_length=200, examples=["awa@example.com"]), AfterValidator(_check_email)]
Body = Annotated[str, Field(min_length=1, max_length=BODY_MAX, description=f"1 to {BODY_MAX} characters")]
Capacity = Annotated[StrictInt, Field(ge=1, le=1000, description="Most open conversations at once")]


# --------------------------------------------------------------------------------------------- agents


class AgentCreate(StrictModel):
    """An agent needs a phone or an email (or both); it starts OFFLINE."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "Awa Ndiaye", "phone": "+221771234567", "email": "awa@example.com", "capacity": 10}
            ]
        }
    )

    name: str = Field(min_length=1, max_length=200)
    phone: Phone | None = None
    email: Email | None = None
    capacity: Capacity = 10


class AgentUpdate(StrictModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"capacity": 5}]})

    capacity: Capacity


class PresenceIn(StrictModel):
    """ONLINE: connected (joins the rotation); AWAY: keeps its conversations, takes no new one;
    OFFLINE: disconnected (its conversations move on)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ONLINE"}]})

    status: Presence


class AgentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    phone: str | None
    email: str | None
    capacity: int
    presence: Presence
    open_conversations: int = Field(description="ASSIGNED conversations held now")
    last_heartbeat_at: datetime | None
    connected_at: datetime | None
    created_at: datetime


class QueueEntryOut(BaseModel):
    """An agent and its place in the rotation: ``position`` 1 is the next to take a conversation, None
    when not in the rotation (AWAY or OFFLINE)."""

    position: int | None
    agent_id: str
    name: str
    presence: Presence
    load: int = Field(description="open conversations held now")
    capacity: int


class DistributeOut(BaseModel):
    assigned: int = Field(description="pending conversations given to an agent by this distribution")


# -------------------------------------------------------------------------------------- conversations


class InboundIn(StrictModel):
    """A customer message from another channel than the WhatsApp webhook."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"customer_phone": "+221770000001", "body": "Bonjour, ma commande ?"}]
        }
    )

    customer_phone: Phone
    body: Body


class ReplyIn(StrictModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"body": "Bonjour, je regarde tout de suite."}]}
    )

    body: Body


class AssignIn(StrictModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"agent_id": "agt_…"}]})

    agent_id: str = Field(min_length=1, max_length=ID_MAX)


class ConversationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    customer_phone: str
    status: ConversationStatus
    agent_id: str | None
    opened_at: datetime
    last_message_at: datetime
    awaiting_reply_since: datetime | None = Field(description="oldest customer message not yet answered")
    assigned_at: datetime | None
    first_assigned_at: datetime | None
    first_reply_at: datetime | None
    pending_since: datetime | None
    pending_notice_sent: bool
    reassignments: int
    closed_at: datetime | None
    close_reason: str | None


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    conversation_id: str
    direction: Direction = Field(description="IN from the customer, OUT from an agent")
    body: str | None
    agent_id: str | None = Field(description="the agent who wrote it (OUT; None when staff wrote it)")
    inbound_message_id: str | None = Field(description="the webhook's inbox row (IN, by WhatsApp)")
    notification_id: str | None = Field(description="the outbox row that carries it (OUT)")
    created_at: datetime


# ---------------------------------------------------------------------------------------------- stats


class Percentiles(BaseModel):
    count: int
    p50: float | None
    p95: float | None


class AgentAssignments(BaseModel):
    agent_id: str
    name: str | None
    assignments: int


class AssignmentStats(BaseModel):
    total: int
    spread: int | None = Field(description="most minus fewest assignments among the agents listed")
    per_agent: list[AgentAssignments]


class ReassignmentStats(BaseModel):
    total: int
    by_reason: dict[str, int]


class PendingStats(BaseModel):
    now: int = Field(description="conversations pending at the time of the request")
    at_start: int = Field(description="conversations pending at `from`")
    peak: int = Field(description="most conversations pending at once within [from, to)")
    peak_at: datetime | None = Field(description="when the peak was first reached (None: at `from`)")


class DispatcherStatsOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    conversations_opened: int
    assignments: AssignmentStats
    time_to_assign_s: Percentiles
    time_to_first_reply_s: Percentiles
    reassignments: ReassignmentStats
    pending: PendingStats
