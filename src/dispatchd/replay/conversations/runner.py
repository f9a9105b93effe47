"""Running a conversation replay against a server: deliveries, simulated agents, the read-back."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from rich.console import Console

from dispatchd.replay.conversations.plan import (
    _READ_CONCURRENCY,
    _SEND_ATTEMPTS,
    _SEND_CONCURRENCY,
    _STAT_TYPES,
    _TOPICS_PER_READ,
    BREAK_MEAN_S,
    HEARTBEAT_EVERY_S,
    SHIFT_MEAN_S,
    WRAP_UP_S,
    PlannedMessage,
    assignment_violations,
    log_uniform,
    plan_messages,
    signed_delivery,
    text_webhook_payload,
)
from dispatchd.replay.conversations.summary import ConversationReplayOptions, ConversationReplaySummary
from dispatchd.replay.trace import load_trips
from dispatchd.replay.whatsapp import WEBHOOK_PATH

# ---------------------------------------------------------------------------------------------------------
# The run


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@dataclass
class _Agent:
    index: int
    id: str
    headers: dict[str, str]
    rng: random.Random
    online: bool = False
    #: (conversation id, awaiting_reply_since) already answered or being answered
    answering: set[tuple[str, str]] = field(default_factory=set)
    #: conversation id → (last_message_at seen, monotonic time first seen with it)
    quiet_since: dict[str, tuple[str, float]] = field(default_factory=dict)
    closing: set[str] = field(default_factory=set)
    #: presence changes one at a time, so that the drain's ONLINE is the last word
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Run:
    def __init__(self, options: ConversationReplayOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.rng = random.Random(options.seed)
        self.run_tag = f"{secrets.randbelow(1000):03d}"
        self.summary = ConversationReplaySummary(speed=options.speed, capacity=options.capacity)
        self.agents: list[_Agent] = []
        self.admin = {"Authorization": f"Bearer {options.admin_key}"}
        self.stopping = asyncio.Event()
        self.draining = False
        self.tasks: set[asyncio.Task] = set()
        self.accepted: dict[str, PlannedMessage] = {}
        self.http = httpx.AsyncClient(
            base_url=options.url,
            timeout=30,
            limits=httpx.Limits(max_connections=_SEND_CONCURRENCY + 2 * options.agents + 8),
        )

    # -- plumbing -----------------------------------------------------------------------------------------

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _call(
        self, method: str, path: str, headers: Mapping[str, str], *, tries: int = 3, **kwargs: Any
    ) -> httpx.Response | None:
        """One API call, re-tried on a transport error or a 5xx; errors counted, never raised."""
        for attempt in range(tries):
            try:
                answer = await self.http.request(method, path, headers=dict(headers), **kwargs)
            except httpx.TransportError as exc:
                self.summary.http_errors[type(exc).__name__] += 1
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if answer.status_code >= 500:
                self.summary.http_errors[f"{method} {path.split('/')[2]} {answer.status_code}"] += 1
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            return answer
        return None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopping; True when stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=max(0.0, seconds))
            return True
        except TimeoutError:
            return False

    # -- agents -------------------------------------------------------------------------------------------

    async def create_agents(self) -> None:
        for index in range(self.options.agents):
            answer = await self._call(
                "POST",
                "/v1/agents",
                self.admin,
                json={
                    "name": f"Replay agent {index + 1:02d}",
                    "email": f"agent{index + 1:02d}.r{self.run_tag}.{secrets.token_hex(2)}@replay.example",
                    "capacity": self.options.capacity,
                },
            )
            if answer is None or answer.status_code != 201:
                detail = "no answer" if answer is None else f"{answer.status_code} {answer.text[:300]}"
                raise RuntimeError(f"POST /v1/agents failed: {detail}")
            agent_id = answer.json()["id"]
            key = await self._call(
                "POST",
                "/v1/api-keys",
                self.admin,
                json={"role": "agent", "subject": f"agent:{agent_id}", "name": f"replay agent {index + 1}"},
            )
            headers = (
                {"Authorization": f"Bearer {key.json()['key']}"}
                if key is not None and key.status_code == 201
                else self.admin
            )
            self.agents.append(
                _Agent(index, agent_id, headers, random.Random(f"{self.options.seed}:agent:{index}"))
            )

    async def set_presence(self, agent: _Agent, status: str, *, draining: bool = False) -> None:
        """Change the agent's presence; once the drain has begun only the drain changes it."""
        async with agent.lock:
            if self.draining and not draining:
                return
            answer = await self._call(
                "POST", f"/v1/agents/{agent.id}/presence", agent.headers, json={"status": status}
            )
            if answer is not None and answer.status_code == 200:
                agent.online = status == "ONLINE"
                self.summary.presence_changes += 1
            else:
                self.summary.http_errors[f"presence {None if answer is None else answer.status_code}"] += 1

    async def presence_loop(self, agent: _Agent) -> None:
        """On shift, on break, on shift… (trace time); every agent works during the drain."""
        speed = self.options.speed
        on_at_start = not self.options.presence_changes or agent.rng.random() < 0.8 or agent.index == 0
        if on_at_start:
            await self.set_presence(agent, "ONLINE")
        last_beat = time.monotonic()
        while not self.stopping.is_set():
            if agent.online:
                span = agent.rng.expovariate(1 / SHIFT_MEAN_S) / speed
            else:
                span = agent.rng.expovariate(1 / BREAK_MEAN_S) / speed
            until = time.monotonic() + span
            while time.monotonic() < until and not self.stopping.is_set():
                if self.draining:
                    break
                if agent.online and time.monotonic() - last_beat >= HEARTBEAT_EVERY_S:
                    await self._call("POST", f"/v1/agents/{agent.id}/heartbeat", agent.headers)
                    last_beat = time.monotonic()
                await self._sleep(min(1.0, until - time.monotonic()))
            if self.stopping.is_set():
                return
            if self.draining:
                while not self.stopping.is_set():  # the drain put everyone ONLINE: heartbeats only
                    if await self._sleep(HEARTBEAT_EVERY_S):
                        return
                    await self._call("POST", f"/v1/agents/{agent.id}/heartbeat", agent.headers)
                return
            if self.options.presence_changes:
                await self.set_presence(agent, "OFFLINE" if agent.online else "ONLINE")
                last_beat = time.monotonic()
            elif not agent.online:
                await self.set_presence(agent, "ONLINE")

    async def work_loop(self, agent: _Agent) -> None:
        """Read my ASSIGNED conversations; answer what waits; close what has been quiet long enough."""
        wrap_up_real = WRAP_UP_S / self.options.speed
        while not await self._sleep(self.options.poll_s):
            if not agent.online:
                continue
            answer = await self._call(
                "GET",
                "/v1/conversations",
                agent.headers,
                params={"agent_id": agent.id, "status": "ASSIGNED", "limit": 1000},
                tries=1,
            )
            if answer is None or answer.status_code != 200:
                continue
            now = time.monotonic()
            for conversation in answer.json():
                conversation_id = conversation["id"]
                waiting = conversation.get("awaiting_reply_since")
                if waiting is not None:
                    agent.quiet_since.pop(conversation_id, None)
                    if (conversation_id, waiting) not in agent.answering:
                        agent.answering.add((conversation_id, waiting))
                        self._spawn(self.reply_later(agent, conversation_id))
                    continue
                last = conversation.get("last_message_at") or ""
                seen = agent.quiet_since.get(conversation_id)
                if seen is None or seen[0] != last:
                    agent.quiet_since[conversation_id] = (last, now)
                elif now - seen[1] >= wrap_up_real and conversation_id not in agent.closing:
                    agent.closing.add(conversation_id)
                    self._spawn(self.close(agent, conversation_id))

    async def reply_later(self, agent: _Agent, conversation_id: str) -> None:
        delay = log_uniform(agent.rng, *self.options.reply_delay_s) / self.options.speed
        if await self._sleep(delay):
            return
        answer = await self._call(
            "POST",
            f"/v1/conversations/{conversation_id}/messages",
            agent.headers,
            json={"body": f"Bonjour, ici l'agent {agent.index + 1:02d} : je regarde votre demande."},
        )
        if answer is not None and answer.status_code == 201:
            self.summary.replies += 1
        else:
            self.summary.replies_refused += 1  # moved to another agent (403) or closed (409) meanwhile

    async def close(self, agent: _Agent, conversation_id: str) -> None:
        answer = await self._call("POST", f"/v1/conversations/{conversation_id}/close", agent.headers)
        if answer is not None and answer.status_code == 200:
            self.summary.closes += 1
        agent.quiet_since.pop(conversation_id, None)

    # -- customers ----------------------------------------------------------------------------------------

    async def send(self, message: PlannedMessage, semaphore: asyncio.Semaphore) -> None:
        payload = text_webhook_payload(
            from_wa_id=message.wa_id, wamid=message.wamid, body=message.body, timestamp=int(time.time())
        )
        body, headers = signed_delivery(self.options.webhook_secret, payload)
        async with semaphore:
            for attempt in range(_SEND_ATTEMPTS):  # Meta re-delivers the same wamid until it gets a 200
                started = time.perf_counter()
                try:
                    answer = await self.http.post(WEBHOOK_PATH, content=body, headers=headers)
                except httpx.TransportError as exc:
                    self.summary.http_errors[f"webhook {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                if answer.status_code == 200:
                    self.summary.webhook_answer_s.append(time.perf_counter() - started)
                    self.summary.duplicates_acknowledged += int(answer.json().get("duplicates", 0))
                    self.accepted[message.tag] = message
                    return
                self.summary.http_errors[f"webhook {answer.status_code}"] += 1
                if answer.status_code < 500:
                    break  # a 4xx (bad signature, no secret configured) will not get better
                await asyncio.sleep(0.5 * (attempt + 1))
        self.summary.messages_refused += 1

    async def customers(self, plan: Sequence[PlannedMessage]) -> None:
        semaphore = asyncio.Semaphore(_SEND_CONCURRENCY)
        started = time.monotonic()
        sends = []
        for message in plan:
            delay = started + message.due_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sends.append(asyncio.create_task(self.send(message, semaphore)))
        await asyncio.gather(*sends)

    async def sample_pending(self) -> None:
        while not await self._sleep(1.0):
            answer = await self._call(
                "GET", "/v1/conversations", self.admin, params={"status": "PENDING", "limit": 1000}, tries=1
            )
            if answer is not None and answer.status_code == 200:
                mine = [c for c in answer.json() if self._ours(c)]
                self.summary.pending_peak_sampled = max(self.summary.pending_peak_sampled, len(mine))

    # -- read-back ----------------------------------------------------------------------------------------

    def _ours(self, conversation: Mapping[str, Any]) -> bool:
        return str(conversation.get("customer_phone", "")).startswith(f"+1555{self.run_tag}")

    async def conversations(self, status: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            params: dict[str, Any] = {"limit": 1000, "offset": offset}
            if status:
                params["status"] = status
            answer = await self._call("GET", "/v1/conversations", self.admin, params=params)
            if answer is None or answer.status_code != 200:
                raise RuntimeError(f"GET /v1/conversations failed: {answer and answer.text[:300]}")
            page = answer.json()
            found.extend(c for c in page if self._ours(c))
            if len(page) < 1000:
                return found
            offset += 1000

    async def drain(self) -> None:
        """Every agent ONLINE; wait until nothing of this run is PENDING or waiting for a reply."""
        self.draining = True
        for agent in self.agents:
            await self.set_presence(agent, "ONLINE", draining=True)
        deadline = time.monotonic() + self.options.drain_timeout_s
        while True:
            pending = await self.conversations("PENDING")
            waiting = [c for c in await self.conversations("ASSIGNED") if c.get("awaiting_reply_since")]
            if not pending and not waiting:
                return
            if time.monotonic() >= deadline:
                self.console.print(
                    f"[yellow]after {self.options.drain_timeout_s:g} s: {len(pending)} conversations still "
                    f"PENDING, {len(waiting)} waiting for a reply[/]"
                )
                if pending:  # nothing more will happen to them without a distribution: force one
                    await self._call("POST", "/v1/dispatcher/distribute", self.admin)
                return
            await asyncio.sleep(1.0)

    async def read_back(self, since: datetime) -> None:
        summary = self.summary
        conversations = await self.conversations()
        summary.conversations = len(conversations)
        summary.conversations_open_at_end = dict(Counter(c["status"] for c in conversations))
        for conversation in conversations:
            opened = _utc(conversation["opened_at"])
            assigned, replied = (
                _utc(conversation.get("first_assigned_at")),
                _utc(conversation.get("first_reply_at")),
            )
            if opened and assigned:
                summary.time_to_assign_s.append(max(0.0, (assigned - opened).total_seconds()))
            if opened and replied:
                summary.time_to_first_reply_s.append(max(0.0, (replied - opened).total_seconds()))
        # two open conversations of one customer at once: their [opened, closed) intervals overlap
        by_customer: dict[str, list[tuple[datetime, datetime]]] = {}
        far = datetime.max.replace(tzinfo=UTC)
        for conversation in conversations:
            span = (_utc(conversation["opened_at"]), _utc(conversation.get("closed_at")) or far)
            by_customer.setdefault(conversation["customer_phone"], []).append(span)  # type: ignore[arg-type]
        for spans in by_customer.values():
            spans.sort()
            if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)):
                summary.customers_with_two_open += 1

        semaphore = asyncio.Semaphore(_READ_CONCURRENCY)
        stored: Counter[str] = Counter()

        async def thread(conversation_id: str) -> None:
            async with semaphore:
                answer = await self._call(
                    "GET", f"/v1/conversations/{conversation_id}/messages", self.admin, params={"limit": 1000}
                )
            if answer is None or answer.status_code != 200:
                raise RuntimeError(f"reading the thread of {conversation_id} failed")
            for message in answer.json():
                body = message.get("body") or ""
                if message.get("direction") == "IN" and body.endswith("]") and "[" in body:
                    stored[body[body.rindex("[") + 1 : -1]] += 1

        await asyncio.gather(*(thread(c["id"]) for c in conversations))
        summary.messages_accepted = len(self.accepted)
        summary.messages_stored = sum(stored.values())
        summary.stored_twice = sum(1 for count in stored.values() if count > 1)
        summary.messages_lost = sum(1 for tag in self.accepted if tag not in stored)

        history: list[dict[str, Any]] = []

        async def events_of(ids: list[str]) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            after = 0
            while True:
                async with semaphore:
                    answer = await self._call(
                        "GET",
                        "/v1/events",
                        self.admin,
                        params=[("after", after), ("limit", 1000)]
                        + [("topic", f"conversation:{i}") for i in ids],
                    )
                if answer is None or answer.status_code != 200:
                    raise RuntimeError(f"GET /v1/events failed: {answer and answer.text[:300]}")
                page = answer.json()
                found.extend(e for e in page["events"] if e["type"] in _STAT_TYPES)
                if len(page["events"]) < 1000:
                    return found
                after = page["next_after"]

        ids = [c["id"] for c in conversations]
        batches = await asyncio.gather(
            *(events_of(ids[i : i + _TOPICS_PER_READ]) for i in range(0, len(ids), _TOPICS_PER_READ))
        )
        for batch in batches:
            history.extend(batch)
        history.sort(key=lambda event: event["id"])
        audit = assignment_violations(history)
        summary.violations = audit.violations
        summary.double_assigned = len({conversation for conversation, _ in audit.violations})
        summary.assignments_per_agent = {
            agent.id: audit.assignments.get(agent.id, 0) for agent in self.agents
        }
        summary.agent_peak_load = max(audit.peak_load.values(), default=0)
        for conversation in conversations:  # the walk must end where the rows are
            if conversation["status"] != "CLOSED" and audit.holders.get(
                conversation["id"]
            ) != conversation.get("agent_id"):
                summary.violations.append(
                    (
                        conversation["id"],
                        f"events end with {audit.holders.get(conversation['id'])}, row says "
                        f"{conversation.get('agent_id')}",
                    )
                )
                summary.double_assigned = len({conversation for conversation, _ in summary.violations})

        answer = await self._call(
            "GET",
            "/v1/dispatcher/stats",
            self.admin,
            params={"from": since.isoformat(), "to": (datetime.now(UTC) + timedelta(seconds=5)).isoformat()},
        )
        if answer is not None and answer.status_code == 200:
            summary.stats = answer.json()

    # -- sequence -----------------------------------------------------------------------------------------

    async def run(self) -> ConversationReplaySummary:
        options, summary = self.options, self.summary
        began = time.monotonic()
        since = datetime.now(UTC) - timedelta(seconds=5)  # stats window; a server clock a little off is fine
        try:
            trips = load_trips(options.trips_path, options.start, options.end)
            if not trips:
                summary.aborted = "no pickup in the time window"
                return summary
            plan = plan_messages(trips, options.speed, self.rng, self.run_tag)
            summary.customers, summary.messages_planned = len(trips), len(plan)
            last_due = plan[-1].due_s
            self.console.print(
                f"{len(trips)} customers, {len(plan)} messages over {last_due:.0f} s at ×{options.speed:g}; "
                f"{options.agents} agents of capacity {options.capacity} (run {self.run_tag})"
            )
            await self.create_agents()
            background = [self._spawn(self.sample_pending())]
            for agent in self.agents:
                background.append(self._spawn(self.presence_loop(agent)))
                background.append(self._spawn(self.work_loop(agent)))
            await self.customers(plan)
            self.console.print(f"all messages sent after {time.monotonic() - began:.0f} s; draining…")
            await self.drain()
            self.stopping.set()
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
            await self.read_back(since)
        except (RuntimeError, httpx.HTTPError, ValueError) as exc:
            summary.aborted = f"{type(exc).__name__}: {exc}"
        finally:
            self.stopping.set()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
            await self.http.aclose()
            summary.wall_s = time.monotonic() - began
        return summary


async def run_conversation_replay(
    options: ConversationReplayOptions, console: Console | None = None
) -> ConversationReplaySummary:
    """Run one replay against the server at ``options.url``; see the module doc."""
    return await _Run(options, console or Console()).run()
