"""Prometheus metrics of the realtime streams (seed 002 §Recommandations 7), at ``GET /metrics``."""

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("dispatchd_stream_connections", "Open streams, by transport", ["transport"])
EVENTS_PUSHED = Counter("dispatchd_stream_events_pushed_total", "Events written to streams", ["transport"])
EVENTS_READ = Counter("dispatchd_stream_events_read_total", "Events the hub read from the log and fanned out")
PUSH_LATENCY = Histogram(
    "dispatchd_stream_push_latency_seconds",
    "From an event's transaction time (its created_at, which precedes its commit) to the write on a socket",
    ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RESUMES = Counter(
    "dispatchd_stream_resumes_total", "Streams opened with Last-Event-ID or after", ["transport"]
)
SLOW_CONSUMERS_CLOSED = Counter(
    "dispatchd_stream_slow_consumers_closed_total",
    "Streams closed because their queue was full",
    ["transport"],
)
TOKENS_REFUSED = Counter(
    "dispatchd_stream_tokens_refused_total", "Stream tokens refused, by reason", ["reason"]
)
TOKENS_ISSUED = Counter("dispatchd_stream_tokens_issued_total", "Stream tokens issued")
