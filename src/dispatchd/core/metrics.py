"""Prometheus metrics (prometheus-client), process-wide. Exposed at ``GET /metrics``."""

from prometheus_client import Counter, Gauge, Histogram

MATCHING_STARTED = Counter("dispatchd_matching_started_total", "Searches started")
OFFERS_SENT = Counter("dispatchd_offers_sent_total", "Driver offers written (all waves)")
OFFER_OUTCOMES = Counter("dispatchd_offer_outcomes_total", "Offers resolved, by outcome", ["outcome"])
BOOKINGS_FINISHED = Counter(
    "dispatchd_matching_finished_total", "Searches ended, by final status", ["status"]
)
TIME_TO_MATCH = Histogram(
    "dispatchd_time_to_match_seconds",
    "From matching start to assignment",
    buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300),
)
BROADCAST_SIZE = Histogram(
    "dispatchd_broadcast_drivers",
    "Drivers offered per wave",
    buckets=(0, 1, 5, 10, 50, 100, 500, 1000, 10000),
)
SWEEPER_TICKS = Counter("dispatchd_sweeper_ticks_total", "Sweeper iterations")
SWEEPER_HANDLED = Counter("dispatchd_sweeper_handled_total", "Due rows handled, by deadline", ["deadline"])
SWEEPER_LAG = Gauge("dispatchd_sweeper_lag_seconds", "Age of the oldest deadline still due after a tick")
NOTIFICATIONS = Counter(
    "dispatchd_notifications_total",
    "Delivery attempts, by channel, outcome (sent, retry, failed, expired, template) and error class",
    ["channel", "outcome", "error_class"],
)
SEND_LATENCY = Histogram(
    "dispatchd_notification_send_seconds",
    "Duration of one provider call",
    ["channel"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
NOTIFICATION_BACKLOG = Gauge("dispatchd_notification_backlog", "Notifications waiting to be sent")
OLDEST_PENDING_AGE = Gauge(
    "dispatchd_notification_oldest_pending_seconds", "Age of the oldest waiting message"
)
OLDEST_MUST_DELIVER_AGE = Gauge(
    "dispatchd_notification_oldest_customer_or_admin_due_seconds",
    "How long the oldest due, unsent customer or admin message has waited (0 when none)",
)
HELD_BY_PACING = Gauge(
    "dispatchd_notification_held_by_pacing", "Due messages waiting only for their phone's next pacing slot"
)
CIRCUIT_STATE = Gauge("dispatchd_channel_circuit_state", "0 closed, 1 open, 2 half-open", ["channel"])
UNKNOWN_ERRORS = Counter(
    "dispatchd_notification_unknown_errors_total", "Provider errors not in the table", ["channel"]
)
INBOUND_ROUTED = Counter(
    "dispatchd_inbound_routed_total",
    "Inbound messages routed, by the handler that took them (or unrouted, failed)",
    ["handler"],
)
