"""Prometheus metrics of the dispatcher (seed 001), exposed at ``GET /metrics``."""

from prometheus_client import Counter, Gauge, Histogram

CONVERSATIONS_OPENED = Counter("dispatchd_conversations_opened_total", "Conversations opened")
CONVERSATIONS_CLOSED = Counter(
    "dispatchd_conversations_closed_total", "Conversations closed, by reason", ["reason"]
)
CONVERSATIONS_REASSIGNED = Counter(
    "dispatchd_conversations_reassigned_total",
    "Conversations handed from one agent on, by reason",
    ["reason"],
)
TIME_TO_ASSIGN = Histogram(
    "dispatchd_conversation_time_to_assign_seconds",
    "From a conversation's first message (or its wait) to its agent",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 600, 1800, 3600),
)
CONVERSATIONS_BY_STATUS = Gauge(
    "dispatchd_conversations", "Open conversations by status (refreshed at scrape)", ["status"]
)
PENDING_OLDEST = Gauge(
    "dispatchd_conversation_pending_oldest_seconds", "Age of the oldest pending conversation (at scrape)"
)
AGENT_LOAD = Gauge(
    "dispatchd_agent_open_conversations", "Open conversations per agent (at scrape)", ["agent_id"]
)
