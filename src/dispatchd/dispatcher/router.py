"""HTTP routes of the dispatcher (seed 001 §4.8), under ``/v1``: a controller with no logic. Every
decision (keep, assign, hold) is the orchestrator's; the routes check who may call, then call the
:class:`~dispatchd.dispatcher.service.DispatcherService`.

Who may call: staff keys (``admin``, ``integration``) everything here; an ``agent`` key (bound to
``agent:<id>``) acts only as its own agent (read itself, presence, heartbeat) and on the
conversations assigned to it now (read, answer, close). Anything else: 403 ``FORBIDDEN``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from dispatchd.core.auth import Principal
from dispatchd.core.errors import Forbidden, InvalidInput
from dispatchd.core.schemas import UtcDateTime
from dispatchd.deps import principal
from dispatchd.dispatcher import stats
from dispatchd.dispatcher.models import Conversation, ConversationStatus
from dispatchd.dispatcher.schemas import (
    ID_MAX,
    AgentCreate,
    AgentOut,
    AgentUpdate,
    AssignIn,
    ConversationOut,
    DispatcherStatsOut,
    DistributeOut,
    InboundIn,
    MessageOut,
    PresenceIn,
    QueueEntryOut,
    ReplyIn,
)
from dispatchd.dispatcher.service import DispatcherService

router = APIRouter(prefix="/v1", tags=["dispatcher"])

AgentId = Annotated[str, Query(min_length=1, max_length=ID_MAX)]


async def service(request: Request) -> DispatcherService:
    return request.app.state.services.dispatcher


def _own_conversation(who: Principal, conversation: Conversation) -> None:
    """Raise :class:`Forbidden` unless staff or the agent the conversation is assigned to."""
    if who.is_staff:
        return
    if who.agent_id is None or conversation.agent_id != who.agent_id:
        raise Forbidden("an agent key may act only on the conversations assigned to its agent")


# --------------------------------------------------------------------------------------------- agents


@router.post("/agents", status_code=201, response_model=AgentOut, summary="Register an agent (OFFLINE)")
async def create_agent(
    body: AgentCreate, who: Principal = Depends(principal), dispatcher: DispatcherService = Depends(service)
):
    """Staff only. Raises 422 ``VALIDATION_ERROR`` without a phone or an email."""
    who.require_staff()
    return await dispatcher.create_agent(body.model_dump(exclude_none=True))


@router.get("/agents", response_model=list[AgentOut], summary="List agents")
async def list_agents(who: Principal = Depends(principal), dispatcher: DispatcherService = Depends(service)):
    who.require_staff()
    return await dispatcher.list_agents()


@router.get("/agents/{agent_id}", response_model=AgentOut, summary="Read an agent")
async def get_agent(
    agent_id: str, who: Principal = Depends(principal), dispatcher: DispatcherService = Depends(service)
):
    """Staff, or that agent's own key (else 403). Raises 404 ``AGENT_NOT_FOUND``."""
    who.require_agent(agent_id)
    return await dispatcher.get_agent(agent_id)


@router.patch("/agents/{agent_id}", response_model=AgentOut, summary="Change an agent's capacity")
async def update_agent(
    agent_id: str,
    body: AgentUpdate,
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """Staff only. A lower capacity takes nothing away: the agent gets no new conversation until its
    load is below it. Raises 404 ``AGENT_NOT_FOUND``."""
    who.require_staff()
    return await dispatcher.set_capacity(agent_id, body.capacity)


@router.post("/agents/{agent_id}/presence", response_model=AgentOut, summary="Connect, step away, disconnect")
async def set_presence(
    agent_id: str,
    body: PresenceIn,
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """Staff, or the agent itself. ONLINE joins the rotation and the pending conversations are
    distributed (oldest first); AWAY keeps its conversations and takes no new one; OFFLINE hands each
    of its conversations to the next agent or to pending. Raises 404 ``AGENT_NOT_FOUND``."""
    who.require_agent(agent_id)
    return await dispatcher.set_presence(agent_id, body.status)


@router.post("/agents/{agent_id}/heartbeat", response_model=AgentOut, summary="Agent app is alive")
async def heartbeat(
    agent_id: str, who: Principal = Depends(principal), dispatcher: DispatcherService = Depends(service)
):
    """Staff, or the agent itself. Without one for ``DISPATCHD_AGENT_PRESENCE_TIMEOUT_S`` the agent is
    disconnected. Raises 404 ``AGENT_NOT_FOUND``, 409 ``INVALID_STATE`` when OFFLINE (connect first)."""
    who.require_agent(agent_id)
    return await dispatcher.heartbeat(agent_id)


# -------------------------------------------------------------------------------------- conversations


@router.post(
    "/conversations/inbound",
    response_model=ConversationOut,
    summary="A customer message from another channel",
)
async def message_in(
    body: InboundIn, who: Principal = Depends(principal), dispatcher: DispatcherService = Depends(service)
):
    """Staff only. As a WhatsApp message: the customer's open conversation (or a new one) gets it, then
    keeps its online agent, goes to the next agent with room, or waits (PENDING)."""
    who.require_staff()
    return await dispatcher.message_in(body.customer_phone, body.body)


@router.get("/conversations", response_model=list[ConversationOut], summary="List conversations")
async def list_conversations(
    status: ConversationStatus | None = None,
    agent_id: AgentId | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=1_000_000),
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """Most recent message first. Staff see every conversation; an agent key sees only those assigned
    to its agent (``agent_id`` defaults to its own; another one is 403)."""
    if not who.is_staff:
        if who.agent_id is None:
            raise Forbidden("this action needs an admin, integration or agent key")
        who.require_agent(agent_id or who.agent_id)
        agent_id = who.agent_id
    return await dispatcher.list_conversations(status=status, agent_id=agent_id, limit=limit, offset=offset)


@router.get("/conversations/{conversation_id}", response_model=ConversationOut, summary="Read a conversation")
async def get_conversation(
    conversation_id: str,
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """Staff, or the agent it is assigned to (else 403). Raises 404 ``CONVERSATION_NOT_FOUND``."""
    conversation = await dispatcher.get_conversation(conversation_id)
    _own_conversation(who, conversation)
    return conversation


@router.get(
    "/conversations/{conversation_id}/messages",
    response_model=list[MessageOut],
    summary="A conversation's thread, in order",
)
async def thread(
    conversation_id: str,
    limit: int = Query(500, ge=1, le=1000),
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """Inbound and outbound messages, oldest first. Staff, or the agent it is assigned to (else 403).
    Raises 404 ``CONVERSATION_NOT_FOUND``."""
    _own_conversation(who, await dispatcher.get_conversation(conversation_id))
    return await dispatcher.thread(conversation_id, limit=limit)


@router.post(
    "/conversations/{conversation_id}/messages",
    status_code=201,
    response_model=MessageOut,
    summary="Answer the customer (through the outbox)",
)
async def reply(
    conversation_id: str,
    body: ReplyIn,
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """The agent it is assigned to, or staff (else 403). The message joins the thread and goes to the
    customer through the outbox. Raises 404 ``CONVERSATION_NOT_FOUND``, 409 ``INVALID_STATE`` (CLOSED)."""
    _own_conversation(who, await dispatcher.get_conversation(conversation_id))
    return await dispatcher.reply(conversation_id, who.agent_id, body.body)


@router.post(
    "/conversations/{conversation_id}/assign",
    response_model=ConversationOut,
    summary="Transfer a conversation to an agent (audited)",
)
async def assign(
    conversation_id: str,
    body: AssignIn,
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """Staff only. The agent must be ONLINE with room; the ``ConversationReassigned`` event's reason
    names the key that asked (``transfer by <role>:<key id>``). Raises 404 ``CONVERSATION_NOT_FOUND``
    / ``AGENT_NOT_FOUND``, 409 ``INVALID_STATE`` (CLOSED), 409 ``AGENT_UNAVAILABLE`` (not ONLINE, or
    full)."""
    who.require_staff()
    return await dispatcher.assign(conversation_id, body.agent_id, f"{who.role.value}:{who.key_id}")


@router.post(
    "/conversations/{conversation_id}/close", response_model=ConversationOut, summary="Close a conversation"
)
async def close(
    conversation_id: str,
    who: Principal = Depends(principal),
    dispatcher: DispatcherService = Depends(service),
):
    """Staff, or the agent it is assigned to (else 403). Closing a CLOSED conversation changes nothing.
    The customer's next message opens a new one. Raises 404 ``CONVERSATION_NOT_FOUND``."""
    _own_conversation(who, await dispatcher.get_conversation(conversation_id))
    return await dispatcher.close(
        conversation_id,
        "closed by staff" if who.is_staff else "closed by agent",
        agent_id=None if who.is_staff else who.agent_id,
    )


# ------------------------------------------------------------------------------------------ dispatcher


@router.get("/dispatcher/queue", response_model=list[QueueEntryOut], summary="The rotation, next first")
async def queue_view(who: Principal = Depends(principal), dispatcher: DispatcherService = Depends(service)):
    """Staff only. Agents in rotation order (``position`` 1 takes the next conversation), then the
    agents out of the rotation (``position`` null)."""
    who.require_staff()
    return [
        QueueEntryOut(
            position=position,
            agent_id=agent.id,
            name=agent.name,
            presence=agent.presence,
            load=agent.open_conversations,
            capacity=agent.capacity,
        )
        for agent, position in await dispatcher.queue_view()
    ]


@router.post("/dispatcher/distribute", response_model=DistributeOut, summary="Force a distribution")
async def distribute(who: Principal = Depends(principal), dispatcher: DispatcherService = Depends(service)):
    """Staff only. The pending conversations, oldest first, go to the next agents with room."""
    who.require_staff()
    return DistributeOut(assigned=await dispatcher.distribute())


@router.get(
    "/dispatcher/stats", response_model=DispatcherStatsOut, summary="Dispatcher statistics over [from, to)"
)
async def dispatcher_stats(
    request: Request,
    start: Annotated[UtcDateTime | None, Query(alias="from", description="default: 24 h before `to`")] = None,
    end: Annotated[UtcDateTime | None, Query(alias="to", description="default: now")] = None,
    who: Principal = Depends(principal),
):
    """Staff only. Assignments per agent, time to assign and to first reply (p50, p95, s),
    reassignments by reason, pending peak; see ``dispatchd.dispatcher.stats``. Raises 422
    ``VALIDATION_ERROR`` when ``from`` is not before ``to``."""
    who.require_staff()
    db = request.app.state.services.db
    end = end or db.clock.now()
    start = start or end - timedelta(hours=24)
    if start >= end:
        raise InvalidInput("'from' must be before 'to'")
    return await stats.dispatcher_stats(db, start, end)
