"""Prometheus metrics of seed 003 §3.2, named as the seed names them."""

from prometheus_client import Counter, Gauge, Histogram

RESERVATIONS = Counter("reservations", "Reservations confirmed")
REJECTIONS = Counter("rejections", "Reservations refused, by code", ["code"])
COMMIT_DURATION = Histogram(
    "commit_duration_seconds",
    "Time of one reservation commit, transaction included (one batch of requests: see batch_size)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ACTIVE_RESOURCES = Gauge("active_resources", "OPEN resources (refreshed at each scrape)")
CAPACITY_UTILIZATION = Gauge(
    "capacity_utilization", "Reserved / capacity over OPEN resources (at each scrape)"
)
BATCH_SIZE = Histogram(
    "dispatchd_reservation_batch_size",
    "Reserve requests admitted by one commit (group commit: those that queued behind the commit before)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)
